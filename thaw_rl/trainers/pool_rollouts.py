"""``PoolRollouts``: a trainer's rollouts on a ``ForkPool`` (``rollout_backend="pool"``), synchronous or one step ahead.

Why: generation on the training devices stalls training, and long rollouts or large models outgrow
colocation. Here the tree sampler runs over ForkPool workers on their own devices (``pool_devices``) while
the trainer process keeps training, as TRL's vLLM server mode does, but forking KV.

Weights: the workers build the policy's architecture from its config (random weights, no files) and get
the trainer's parameters before the first rollout and after every optimizer step, broadcast in packed
buckets over a gloo (CPU) or NCCL (GPU) group of the trainer and the workers (``pool/weight_sync.py``). The
pool's weight version is the trainer's ``global_step``; every rollout records the version it sampled with.

Asynchronous rollouts (``async_rollouts=True``): when the trainer fetches the batches of optimizer step
k (``Trainer.get_batch_samples``), it also reads the batches of step k + 1 from the data loader and queues
the rollouts of their prompts on one background thread, so they are generated while step k trains. At
the end of step k the trainer waits for that thread, pushes the new weights, and queues the next. A
rollout is used when TRL asks for exactly its prompts and it is at most ``max_staleness`` versions old;
otherwise it is dropped and the prompts are generated again with the current weights (never used stale).
The sampling logprobs go to TRL's importance-sampling correction (``native_importance_sampling_correction``).

The pool is used by one thread at a time: the background thread between a queueing and the next wait,
the training thread otherwise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from thaw_rl.engine.sampling import SamplingParams, derive_seed
from thaw_rl.rollout import RolloutBatch, TreeSampler, TreeSpec
from thaw_rl.trainers.group_fill import complete_groups

logger = logging.getLogger(__name__)


def model_from_config(config, dtype: torch.dtype) -> tuple[torch.nn.Module, None]:
    """A worker's model: the policy's architecture with placeholder weights (the trainer sends the real ones).

    The placeholders are zeros, not a random init: initializing an 8B model's weights on the host takes
    minutes, and every one of them is overwritten by the first weight push anyway.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the init above; the trainer's parameters are tied (e.g. lm_head)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model.eval(), None


@dataclass
class PooledRollout:
    """One generation batch's rollout and the weight version it was sampled with."""

    batch: RolloutBatch
    filled: int
    version: int


class PoolRollouts:
    """The trainer's end of a ForkPool: build it, push weights, generate now or one step ahead."""

    def __init__(self, args, generation_model: Callable[[], Any], live_parameters: Callable[[], dict[str, torch.Tensor]],
                 step: Callable[[], int]) -> None:
        self.args = args
        self._generation_model = generation_model  # a context: the unwrapped policy, full (ZeRO-3/FSDP gathered)
        self._live_parameters = live_parameters  # -> {name: parameter} as they are, for a replacement's fallback
        self._step = step  # -> the trainer's global_step: the version of the weights it trains
        self.pool = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queued: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self._pending: list[concurrent.futures.Future] = []
        self.staleness_history: list[int] = []  # per used rollout: trainer version - sampling version
        self.num_dropped = 0  # rollouts older than max_staleness, generated again
        self._transfer_seen = (0.0, 0.0)  # the pool's trunk transfer totals (bytes, seconds) at the last metrics()

    # -- the pool and its weights -------------------------------------------------------------------------
    def backend(self):
        """The ForkPool, started and given the trainer's weights on first use."""
        if self.pool is None:
            from thaw_rl.pool import ForkPool

            args = self.args
            with self._generation_model() as model:
                factory = functools.partial(model_from_config, model.config, next(model.parameters()).dtype)
            # the same engine settings as the in-process engine (ThawGRPOTrainer._backend_for), so a pool
            # worker decodes as fast as rollout_backend="native" would on its GPU
            engine_kwargs = dict(block_size=args.kv_block_size, kv_cache_memory=args.engine_kv_cache_memory,
                                 use_cuda_graphs=args.engine_cuda_graphs, compile_layers=args.engine_compile_layers,
                                 fuse_qkv=args.engine_fuse_qkv, cascade_attention=args.engine_cascade_attention,
                                 seed=args.seed, kv_cache_vmm=args.kv_cache_vmm, kv_cache_dtype=args.kv_cache_dtype)
            self.pool = ForkPool(factory, num_workers=args.pool_num_workers, devices=pool_devices(args),
                                 engine_kwargs=engine_kwargs, timeout_s=args.pool_timeout_s, seed=args.seed,
                                 weight_sync="distributed", weight_bucket_bytes=args.pool_weight_bucket_bytes,
                                 weights_source=lambda: (self._step(), self._for_pool(self._live_parameters())))
            self.push_weights()
        return self.pool

    def push_weights(self) -> None:
        """Every worker gets the trainer's current parameters as version ``global_step``."""
        self.wait()
        pool = self.backend()
        with self._generation_model() as model:
            pool.update_weights(self._for_pool(dict(model.named_parameters())), version=self._step())

    def _for_pool(self, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = set(self.pool.parameter_names)
        return {k: v for k, v in parameters.items() if k in names}  # anything the workers' model lacks stays here

    def metrics(self) -> dict[str, float]:
        """Per generation: weight version and last sync time, rollouts dropped, and the trunk bytes and time
        moved between workers since the previous call."""
        pool = self.pool
        if pool is None:
            return {}
        totals = pool.transfer_totals()
        seen, self._transfer_seen = self._transfer_seen, (totals["transfer_bytes"], totals["transfer_seconds"])
        return {"thaw/weight_version": float(pool.version),
                "thaw/weight_sync_ms": 1000.0 * pool.last_weight_sync_seconds,
                "thaw/rollouts_dropped": float(self.num_dropped),
                "thaw/pool_transfer_bytes": float(self._transfer_seen[0] - seen[0]),
                "thaw/pool_transfer_ms": 1000.0 * (self._transfer_seen[1] - seen[1])}

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], spec: TreeSpec, num_generations: int,
                 params: SamplingParams) -> PooledRollout:
        """The rollout of ``prompts``: a queued one if it is fresh enough, else generated now."""
        queue = self._queued.get(_key(prompts))
        if queue:
            future = queue.popleft()
            try:
                rollout = future.result()
            except Exception:  # noqa: BLE001 (generated again below, with the current weights)
                logger.warning("an asynchronous rollout failed; generating it again", exc_info=True)
                rollout = None
            if rollout is not None:
                staleness = self._step() - rollout.version
                if staleness <= self.args.max_staleness:
                    self.staleness_history.append(staleness)
                    return rollout
                self.num_dropped += 1
                logger.info("dropped a rollout %d versions old (max_staleness=%d); generating it again",
                            staleness, self.args.max_staleness)
        self.wait()
        if self.pool is not None and self.pool.version != self._step():
            self.push_weights()
        rollout = self._rollout(prompts, spec, num_generations, params)
        self.staleness_history.append(self._step() - rollout.version)
        return rollout

    def queue(self, prompts: list[list[int]], spec: TreeSpec, num_generations: int, params: SamplingParams) -> None:
        """Start generating ``prompts`` in the background with the current weights (one rollout at a time)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="thaw-pool-rollouts")
        self.backend()
        future = self._executor.submit(self._rollout, prompts, spec, num_generations, params)
        self._queued[_key(prompts)].append(future)
        self._pending.append(future)

    def wait(self) -> None:
        """Until no rollout runs in the background (the pool is then free for this thread)."""
        for future in self._pending:
            concurrent.futures.wait([future])
        self._pending.clear()

    def _rollout(self, prompts, spec, num_generations, params) -> PooledRollout:
        pool = self.backend()
        version = pool.version
        batch = TreeSampler(pool, spec).rollout(prompts, params)
        filled = 0
        if len(batch.leaves) < num_generations * len(prompts):
            batch, filled = complete_groups(pool, batch, num_generations, params)
        if pool.version != version:
            raise RuntimeError(f"the pool's weights changed from version {version} to {pool.version} during a rollout")
        return PooledRollout(batch, filled, version)

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._queued.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class Lookahead:
    """The data loader one optimizer step ahead: hands out step k's batches and keeps step k + 1's.

    Items are counted over the run; item i is a generation batch (TRL generates on it) when
    ``i % generate_every == 0``. ``take`` returns the items TRL asked for and the generation items of the
    next step, whose rollouts can start now.
    """

    def __init__(self, generate_every: int) -> None:
        self.generate_every = generate_every
        self._iterator_id: int | None = None
        self._buffer: collections.deque = collections.deque()  # (item index, batch) read ahead
        self._next_index = 0  # the index of the next item read from the iterator
        self._handed_out = 0  # items returned by take (what TRL's step counter counts)
        self._started: set[int] = set()  # generation items whose rollouts were queued

    def take(self, iterator, num_batches: int) -> tuple[list, list]:
        """(the next ``num_batches`` batches, [(index, generation batch) of this and the next step, not queued yet])."""
        if id(iterator) != self._iterator_id:  # a new epoch: what was read ahead came from the old one
            self._iterator_id = id(iterator)
            self._buffer.clear()
            self._next_index = self._handed_out
        batches = [self._read(iterator) for _ in range(num_batches)]
        batches = [b for b in batches if b is not None]
        self._handed_out += len(batches)
        ahead = [self._peek(iterator) for _ in range(num_batches)]
        to_start = []
        for index, batch in batches + [a for a in ahead if a is not None]:
            if index % self.generate_every == 0 and index not in self._started:
                self._started.add(index)
                to_start.append((index, batch))
        return [b for _, b in batches], to_start

    def _read(self, iterator):
        if self._buffer:
            return self._buffer.popleft()
        return self._pull(iterator)

    def _peek(self, iterator):
        item = self._pull(iterator)
        if item is not None:
            self._buffer.append(item)
        return item

    def _pull(self, iterator):
        try:
            batch = next(iterator)
        except StopIteration:
            return None
        index = self._next_index
        self._next_index += 1
        return index, batch


def pool_devices(args) -> list[str]:
    """This rank's workers' devices: ``pool_devices`` (or every visible GPU past the training ranks' GPUs 0..W-1,
    the CPU when there is none), dealt to the W training ranks round-robin so no two ranks share a worker device."""
    n_gpu = torch.cuda.device_count()
    if args.pool_devices:
        devices = list(args.pool_devices)
    elif n_gpu == 0 or args.use_cpu:
        return ["cpu"]
    else:
        devices = [f"cuda:{i}" for i in range(args.world_size, n_gpu)]
        if not devices:
            raise ValueError(f"rollout_backend='pool' found {n_gpu} GPU(s), all training ({args.world_size} "
                             f"process(es)): set pool_devices (e.g. ['cuda:0'] to share one, with a small "
                             f"kv_cache_memory in bytes) or make more GPUs visible.")
    if args.world_size == 1 or devices == ["cpu"]:
        return devices
    mine = devices[args.process_index::args.world_size]
    if not mine:
        raise ValueError(f"pool_devices={devices} has fewer devices than the {args.world_size} training processes, "
                         f"each of which runs its own pool: give at least {args.world_size} devices.")
    return mine


def rollout_seed(base_seed: int, step: int, rank: int) -> int:
    """The seed of the first generation of optimizer step ``step`` (as ``ThawGRPOTrainer._rollout_seed``)."""
    return derive_seed(derive_seed(derive_seed(base_seed, step), 1), rank)


def prompts_of(trainer, inputs: list[dict]) -> list[list[int]]:
    """The token ids TRL's generation seam will get for a generation batch's rows (as ``GRPOTrainer._generate``)."""
    prompt_ids, _, _ = trainer._tokenize_prompts(copy.deepcopy([x["prompt"] for x in inputs]))
    return [list(p) for p in prompt_ids]


def _key(prompts: list[list[int]]) -> tuple:
    return tuple(tuple(p) for p in prompts)
