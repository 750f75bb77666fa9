"""ThawEngine: prefill a prompt once, fork its KV copy-on-write, and generate many continuations.

The engine runs the caller's own HF model object (no weight copy: a trainer generates with its live
weights) through transformers' attention hook (``attention.py``) over a paged KV cache
(``kv_cache.py``). This class is the public API; the work is split one noun per file and flows one way:

- ``Scheduler`` (scheduler.py) picks what runs in each step: prefill chunks and decode rows of many
  sessions in one forward, within a token budget, preempting a session when blocks run out;
- ``BlockManager`` (block_manager.py) is the only code that changes block tables, refcounts and prefix
  hashes: a fork shares every full block of the parent and copies only its partial last block, so it
  costs O(blocks), not O(tokens x layers);
- ``ModelRunner`` (model_runner.py) runs the model over the packed step; ``sample`` draws the tokens.

A preempted session keeps its sampled tokens and, because the sampling noise is a function of (seed,
position), continues exactly as it would have. A session that cannot fit even alone raises
``KVCacheExhaustedError`` before anything is sampled: nothing is truncated silently.

Weights: ``weight_version`` names the weights the KV was computed with; prefix-cache hashes are salted
with it and snapshots carry it (plus a sampled digest of the weights, ``weights.py``), so KV computed
with other weights is refused on restore and never matched by a later prefill.
"""

from __future__ import annotations

import logging
import numbers
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from thaw_rl.engine.block_manager import BlockManager, KVCacheExhaustedError, prefix_salt
from thaw_rl.engine.cascade import CASCADE_MODES
from thaw_rl.engine.decode_batch import DecodeBatch, LateTokens
from thaw_rl.engine.fused_qkv import FusedQKV
from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache, resolve_kv_cache_dtype, use_vmm
from thaw_rl.engine.model_runner import SUPPORTED_MODEL_TYPES, ModelRunner
from thaw_rl.engine.sampling import SamplingBatch, SamplingParams, check_token_ids, params_and_seeds, sample
from thaw_rl.engine.scheduler import Scheduler
from thaw_rl.engine.session import Session
from thaw_rl.engine.sharding import compute_dtype
from thaw_rl.engine.snapshot import KVSnapshot, check_fingerprint
from thaw_rl.engine.snapshot_handle import SnapshotHandle
from thaw_rl.engine.weights import weights_digest

if TYPE_CHECKING:
    from thaw_rl_kernels.host_transfer import KVTransfer

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "Completion", "EngineStats", "KVCacheExhaustedError", "SnapshotHandle",
           "ThawEngine"]

CPU_KV_CACHE_LIMIT = 512 * 2**20  # the most a default CPU pool grows to (bytes)
CPU_KV_CACHE_INITIAL_BLOCKS = 64  # a default CPU pool (and a VMM pool's mapping) starts this small and grows
DEFAULT_MAX_NUM_SEQS_CUDA = 2048  # rows per step on CUDA when not given (CPU: 256)


@dataclass
class Completion:
    """What one ``generate`` call produced for one session (the session itself keeps the tokens)."""

    token_ids: list[int]
    logprobs: list[float]  # log softmax(logits / T) of each sampled token (T = 1 for greedy)
    entropies: list[float]  # entropy (nats) of softmax(logits / T) at each sampled position
    finish_reason: str  # "stop" (eos or a stop id, included in token_ids) or "length"
    session: Session


@dataclass
class EngineStats:
    """Counters since the engine was built (``reset_stats`` zeroes the counters, not the pool)."""

    num_blocks: int = 0
    num_free_blocks: int = 0
    num_used_blocks: int = 0
    num_cached_blocks: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens that went through the model
    prompt_tokens_reused: int = 0  # prompt tokens found in the prefix cache
    tokens_computed: int = 0  # every token that went through the model (prefill + decode + recompute)
    tokens_generated: int = 0  # sampled tokens
    num_forward_steps: int = 0
    num_forks: int = 0
    fork_seconds: float = 0.0
    num_preemptions: int = 0
    num_cascade_steps: int = 0  # decode steps whose attention read each group's shared blocks once (cascade)


@dataclass
class _Request:
    """One session inside a ``generate`` call. ``params`` may be one object shared by every request of the call
    (its ``seed`` is then the call's); ``seed`` is this request's own."""

    session: Session
    params: SamplingParams
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class DecodeProfile:
    """Where the async decode loop's time goes (host seconds, ``time.perf_counter``), summed over steps.

    ``prepare``: choosing rows, allocating blocks, the device ops and copies that make the next inputs;
    ``launch``: queueing the forward and the sampler; ``wait``: blocked on the previous step's tokens (the
    host is ahead of the GPU); ``process``: appending tokens, stop checks, hashing full blocks. With the
    overlap working, a step costs max(GPU, prepare + launch + process), and ``wait`` is the GPU's lead.

    Per run of the loop (``runs``; one per generate call unless blocks run out): ``loop``, its whole time;
    ``first_prepare``, the prepare of its first step (every row joins; the device has nothing queued) and
    ``last_process``, the process of its last (nothing left to overlap): per-call costs on the critical path.
    """

    steps: int = 0
    rows: int = 0
    prepare: float = 0.0
    launch: float = 0.0
    wait: float = 0.0
    process: float = 0.0
    runs: int = 0
    loop: float = 0.0
    first_prepare: float = 0.0
    last_process: float = 0.0


@dataclass
class _Step:
    """A launched async decode step: its rows, their input positions, and its tokens on the way back."""

    rows: list[_Request]
    positions: list[int]
    sampled: torch.Tensor  # (n,) on the device: the next step's input ids
    tokens: LateTokens  # the same tokens (and logprobs, entropies) on their way to the host


def _advance_bar(bar, requests: list[_Request]) -> None:
    """Move the progress bar to the call's tokens done; nothing to count when it is off (the default: a sum
    over every request after every step, 0.15 ms at 1,024 rows on a 2-core CPU)."""
    if not bar.disable:
        bar.update(_tokens_done(requests) - bar.n)


def _tokens_done(requests: list[_Request]) -> int:
    """Progress of a generate call in tokens: a finished request counts its whole max_tokens (an early stop
    leaves nothing more to do), so the bar reaches 100% when the call ends."""
    return sum(r.params.max_tokens if r.finish_reason else len(r.token_ids) for r in requests)


def _model_dims(config) -> tuple[int, int, int]:
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


def _positive_int(name: str, value, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1 (e.g. {name}={example}).")
    return int(value)


class ThawEngine:
    """Paged-KV generation with copy-on-write fork over an unmodified HF causal LM.

    ``kv_cache_dtype="fp8"`` stores the cache as float8_e4m3fn (``engine/kv_cache.py``): twice the tokens in
    ``kv_cache_memory``, with keys and values rounded (attention reads half the bytes but, widening them in
    registers, ran 0.75-1.02x as fast as bf16 on an H200: a capacity option). The default "auto" keeps the
    model's dtype, so greedy output equals ``model.generate``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        block_size: int = 16,
        kv_cache_memory: int | float | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        layout: str = "layer_major",
        use_cuda_graphs: bool | None = None,
        compile_layers: bool = False,
        seed: int | None = None,
        weight_version: int = 0,
        cascade_attention: str = "auto",
        kv_cache_vmm: bool | None = None,
        fuse_qkv: bool | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        config = model.config
        if cascade_attention not in CASCADE_MODES:
            raise ValueError(f"cascade_attention={cascade_attention!r} must be one of {CASCADE_MODES}: 'auto' (the "
                             "measured default, engine/cascade.py: CUDA-graph decode steps whose rows share long "
                             "prefixes), 'on' (every decode step with shared blocks, CPU too), 'off'.")
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ThawEngine does not support model_type {config.model_type!r}: its attention hook is tested on "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only causal LMs). Use one of "
                f"those families, or generate this model with model.generate."
            )
        block_size = _positive_int("block_size", block_size, 16)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two (e.g. 16).")
        if max_num_seqs is not None:
            max_num_seqs = _positive_int("max_num_seqs", max_num_seqs, 256)
        if max_num_batched_tokens is not None:
            max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens, 2048)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(model)  # FSDP2 mixed precision computes in bf16 over fp32 shards
        num_layers, num_kv_heads, head_dim = _model_dims(config)
        self.spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size,
                                resolve_kv_cache_dtype(kv_cache_dtype, self.dtype))
        self.block_size = block_size
        self.max_model_len = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.vocab_size = config.vocab_size
        # one GEMM for q/k/v per layer from a refreshed copy of the weights (engine/fused_qkv.py); None: on CUDA,
        # where it saves kernel launches per decode step; off on CPU, where the model's own GEMMs run. Made before
        # the KV pool takes its fraction of free memory, so the copy is not what runs out.
        fused = FusedQKV(model) if (self.device.type == "cuda" if fuse_qkv is None else bool(fuse_qkv)) else None
        if fused is not None and fused.num_layers:
            logger.info("thaw-rl: fused q/k/v projections in %d of %d layers, a %.0f MB copy of their weights "
                        "(fuse_qkv=False saves it)", fused.num_layers, config.num_hidden_layers, fused.nbytes / 2**20)
        num_blocks, self._max_num_blocks = self._pool_size(kv_cache_memory)
        self.kv_cache = self._kv_cache(num_blocks, layout, kv_cache_vmm)
        self.fingerprint = self._fingerprint(config)
        self.weight_version = int(weight_version)
        self.block_manager = BlockManager(self.kv_cache.num_blocks, block_size,
                                          prefix_salt(self.fingerprint, self.weight_version))
        self.max_num_batched_tokens = max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        # Rows per step. On CUDA a GRPO step's rows (up to 2,048) decode together, every batch size a graph
        # replay (cuda_graphs._batch_sizes); on CPU a step's cost grows with its rows, so 256 stays.
        max_num_seqs = max_num_seqs or (DEFAULT_MAX_NUM_SEQS_CUDA if self.device.type == "cuda" else 256)
        self.max_num_seqs = max_num_seqs
        self.scheduler = Scheduler(self.block_manager, self.max_num_batched_tokens, max_num_seqs)
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        self.runner = ModelRunner(
            model, self.kv_cache, use_cuda_graphs=use_cuda_graphs, max_num_seqs=max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // block_size), compile_layers=compile_layers,
            cascade_attention=cascade_attention, fused_qkv=fused,
        )
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self._weights_digest = weights_digest(model)
        self._rng = random.Random(seed)
        self._engine_id = id(self)
        self._stats = EngineStats()
        self._cascade_steps_before = 0  # the runner's cascade step count at the last reset_stats
        self._transfer: KVTransfer | None = None
        # Pure-decode steps run in the async loop (``_decode_steps``): inputs made on the device, tokens read
        # one step late. False runs every step synchronously (the same outputs; kept to compare and profile).
        self.async_decode = True
        self.decode_profile: DecodeProfile | None = None  # set one to time the async loop's phases

    # -- construction helpers -------------------------------------------------------------------------
    def _pool_size(self, kv_cache_memory: int | float | None) -> tuple[int, int]:
        """(blocks to allocate now, the most the pool may grow to).

        A byte count or a fraction of free CUDA memory is allocated up front, once. The CPU default
        (None) starts at ``CPU_KV_CACHE_INITIAL_BLOCKS`` and doubles, up to ``CPU_KV_CACHE_LIMIT``, as
        calls need more (``_reserve``): a CPU engine for a few short rollouts costs kilobytes, not 512 MiB.
        """
        bytes_per_block = self.spec.bytes_per_block
        if kv_cache_memory is None and self.device.type != "cuda":
            limit = max(2, CPU_KV_CACHE_LIMIT // bytes_per_block)
            return min(limit, CPU_KV_CACHE_INITIAL_BLOCKS), limit
        if kv_cache_memory is None:
            kv_cache_memory = 0.5
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, numbers.Real):
            raise ValueError(f"kv_cache_memory={kv_cache_memory!r}: give a byte count (int) or a fraction of free "
                             f"CUDA memory (float in (0, 1)).")
        if isinstance(kv_cache_memory, float):
            if not 0.0 < kv_cache_memory < 1.0:
                raise ValueError(f"kv_cache_memory={kv_cache_memory}: a float is a fraction in (0, 1) of free memory.")
            if self.device.type != "cuda":
                raise ValueError("kv_cache_memory as a fraction needs a CUDA device; on CPU give a byte count.")
            free, _ = torch.cuda.mem_get_info(self.device)
            kv_cache_memory = int(free * kv_cache_memory)
        num_blocks = int(kv_cache_memory) // bytes_per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory={kv_cache_memory} bytes holds {num_blocks} KV blocks of {bytes_per_block} bytes; "
                f"give at least {2 * bytes_per_block} bytes."
            )
        return num_blocks, num_blocks

    def _kv_cache(self, num_blocks: int, layout: str, vmm: bool | None) -> PagedKVCache:
        """The pool: addresses for all of it with memory mapped as calls need it (VMM), or ``num_blocks`` through
        PyTorch. A VMM pool that fails to build falls back (logged) unless ``kv_cache_vmm=True`` asked for it."""
        if use_vmm(vmm, self.device):
            try:
                return PagedKVCache(self.spec, self._max_num_blocks, self.device, layout, vmm=True,
                                    initial_blocks=CPU_KV_CACHE_INITIAL_BLOCKS)
            except RuntimeError as err:
                if vmm:
                    raise
                logger.warning("thaw-rl: the KV pool could not be mapped on demand (%s: %s); it is allocated "
                               "through PyTorch instead.", type(err).__name__, err)
        return PagedKVCache(self.spec, num_blocks, self.device, layout)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    def _fingerprint(self, config) -> dict[str, str | int]:
        """What KV computed by this engine depends on besides the weights; snapshots carry it."""
        s = self.spec
        arch = (getattr(config, "architectures", None) or [type(self.model).__name__])[0]
        return {
            "architecture": arch, "model_type": config.model_type, "num_layers": s.num_layers,
            "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "dtype": str(s.dtype).replace("torch.", ""), "block_size": s.block_size,
        }

    # -- public surface: state ------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        st, bm = self._stats, self.block_manager
        unmapped = self._max_num_blocks - bm.num_blocks if self.kv_cache.vmm is not None else 0  # free: mapped on use
        st.num_blocks = bm.num_blocks - 1 + unmapped
        st.num_free_blocks = bm.num_free_blocks + unmapped
        st.num_used_blocks = bm.num_used_blocks
        st.num_cached_blocks = bm.num_cached_blocks
        st.num_cascade_steps = self.runner.cascade.num_cascade_steps - self._cascade_steps_before
        return EngineStats(**vars(st))

    @property
    def max_num_blocks(self) -> int:
        """Usable blocks the pool holds at most (a default CPU pool grows up to this)."""
        return self._max_num_blocks - 1

    def reset_stats(self) -> None:
        self._stats = EngineStats()
        self._cascade_steps_before = self.runner.cascade.num_cascade_steps

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry; if the weights changed since the version was set, bump the version.

        Call it after the weights change (``set_weight_version`` does this and also names the version).
        """
        self._check_weights()
        self.block_manager.reset_prefix_cache()

    def set_weight_version(self, version: int) -> None:
        """Declare the weights' version (e.g. the optimizer step); a new version drops the prefix cache.

        Snapshots carry the version their KV was computed with, and a restore into an engine of another
        version is refused. Bump it after every weight update (``NativeBackend.update_weights`` and the
        ForkPool workers do).
        """
        if isinstance(version, bool) or not isinstance(version, numbers.Integral):
            raise ValueError(f"set_weight_version({version!r}): the version is an int (e.g. the optimizer step).")
        version = int(version)
        if version != self.weight_version:
            self.weight_version = version
            self.block_manager.reset_prefix_cache(salt=prefix_salt(self.fingerprint, version))
        self._weights_digest = weights_digest(self.model)

    def sleep(self) -> None:
        """Give the KV pool's memory back (e.g. to training) and keep everything else: the bookkeeping,
        compiled layers and CUDA graphs. The next call maps a zeroed pool again (``wake_up``). A pool mapped
        on demand (``kv_cache_vmm``, CUDA) keeps its addresses, so graphs stay valid; one allocated through
        PyTorch recaptures them if it lands at another address. The prefix cache is dropped (the KV is gone).

        Refused while sessions hold blocks: free them first (their KV would be lost).
        """
        if self.kv_cache.released:
            return
        if self.block_manager.num_used_blocks:
            raise ValueError(f"sleep() while sessions hold {self.block_manager.num_used_blocks} KV blocks: free "
                             f"every session first (their KV would be lost), or snapshot the ones you need.")
        self.block_manager.reset_prefix_cache()
        self.kv_cache.release()

    def wake_up(self) -> None:
        """Map the KV pool again after ``sleep`` (every call does this itself; a no-op when awake).

        A pool mapped on demand comes back with its first blocks mapped (the block manager starts over
        with those) and maps more as calls need them (``_reserve``); it never moves, so graphs stay valid.
        """
        if not self.kv_cache.released:
            return
        same_address = self.kv_cache.reallocate()
        if self.block_manager.num_blocks != self.kv_cache.num_blocks:
            self.block_manager.reset(self.kv_cache.num_blocks)
        if not same_address:
            self.invalidate_cuda_graphs()

    def close(self) -> None:
        """Free the KV pool for good (a mapped pool gives its addresses back too) and drop the CUDA graphs;
        the engine refuses calls afterwards. Dropping the engine frees the same."""
        if self.block_manager.num_used_blocks:
            raise ValueError(f"close() while sessions hold {self.block_manager.num_used_blocks} KV blocks: free "
                             f"them first.")
        self.invalidate_cuda_graphs()
        self.block_manager.reset_prefix_cache()
        self.kv_cache.close()

    @property
    def is_sleeping(self) -> bool:
        return self.kv_cache.released

    def invalidate_cuda_graphs(self) -> None:
        """Recapture decode graphs at their next use (after the KV pool or parameter tensors moved)."""
        if self.runner.graphs is not None:
            self.runner.graphs.graphs.clear()

    # -- public surface: sessions -----------------------------------------------------------------------
    def prefill(self, prompt_token_ids: Sequence[int]) -> Session:
        """Compute a prompt's KV (reusing cached prefix blocks) and keep the next-token logits."""
        return self.prefill_many([prompt_token_ids])[0]

    def prefill_many(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> list[Session]:
        """Prefill several prompts in packed steps (one forward can hold many prompts)."""
        if isinstance(prompts, (str, bytes)) or hasattr(prompts, "keys") or (
                isinstance(prompts, torch.Tensor) and prompts.ndim != 2):
            raise ValueError("prefill_many takes a list of prompts, each a list of int token ids "
                             "(e.g. tokenizer(texts)[\"input_ids\"]).")
        ids = [check_token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for p in ids:
            self._check_prompt(p)
        self.wake_up()
        self._check_weights()
        self._reserve(sum(self.block_manager.blocks_for(len(p)) for p in ids))
        sessions = [Session(engine_id=self._engine_id, token_ids=p, num_prompt_tokens=len(p),
                            weight_version=self.weight_version) for p in ids]
        for s in sessions:
            self._stats.prompt_tokens_reused += self.block_manager.match_prefix(s)
        try:
            self._run(sessions, requests=None, progress=progress, desc="prefill")
        except KVCacheExhaustedError:
            for s in sessions:
                self.block_manager.free(s)
                s.freed = True
            raise
        return sessions

    def fork(self, session: Session, n: int, at: int | None = None) -> list[Session]:
        """n children that share the parent's full blocks; each gets its own copy of the partial block.

        ``at`` forks at an earlier token position (children keep ``token_ids[:at]``), which is how tree
        methods branch at a high-entropy token inside a segment. A child whose last token's logits are
        not known keeps that token uncomputed, so its first step recomputes one token instead of
        writing into a block that other sessions share.
        """
        self._check_session(session)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"fork(n={n!r}): n is the number of children, an int >= 1.")
        at = session.num_tokens if at is None else at
        if isinstance(at, bool) or not isinstance(at, numbers.Integral) or not 1 <= at <= session.num_tokens:
            raise ValueError(f"fork(at={at!r}) must be an int in [1, {session.num_tokens}] (the session's tokens).")
        n, at = int(n), int(at)
        start = time.perf_counter()
        keep_logits = at == session.num_tokens and session.next_logits is not None
        computed = min(at, session.num_computed)
        if computed == at and not keep_logits:
            computed = at - 1
        self.wake_up()
        if computed % self.block_size:
            self._reserve(n)
        children = [Session(
            engine_id=self._engine_id, token_ids=session.token_ids[:at],
            num_prompt_tokens=min(session.num_prompt_tokens, at), num_computed=computed,
            next_logits=session.next_logits if keep_logits else None, parent_id=session.session_id,
            weight_version=session.weight_version,
        ) for _ in range(n)]
        copies = self.block_manager.fork(session, children, computed)
        if copies:
            self._copy_blocks(copies, computed % self.block_size)
        self._stats.num_forks += 1
        self._stats.fork_seconds += time.perf_counter() - start
        return children

    def generate(
        self,
        sessions: Sequence[Session],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Continue each session until a stop token or max_tokens; sessions keep their new tokens.

        A list of ``SamplingParams`` (one per session) is used as given, seeds included. One
        ``SamplingParams`` carrying a seed samples session i with ``derive_seed(seed, i)``
        (``sampling.params_and_seeds``) so forked children differ and the call is reproducible.
        Raises ``KVCacheExhaustedError`` before sampling anything when a session's prompt plus
        ``max_tokens`` cannot fit the KV pool even alone.
        """
        sessions = list(sessions)
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("generate() got the same session twice; fork it to get independent children.")
        plist, seeds = params_and_seeds(params, len(sessions))
        for s in sessions:
            self._check_session(s)
        in_call: set[int] = set()
        for s in sessions:
            in_call.update(s.block_table)  # a C loop: 1,024 rows of 33 blocks (512-token prompts) in ~0.3 ms
        outside = self.block_manager.num_used_blocks - len(in_call)
        checked = set()  # whether a session fits depends only on its length and max_tokens: check each pair once
        for s, p in zip(sessions, plist):
            if (s.num_tokens, p.max_tokens) not in checked:
                self._check_fits(s, p.max_tokens, outside)
                checked.add((s.num_tokens, p.max_tokens))
        self.wake_up()
        self._check_weights()
        bm = self.block_manager
        self._reserve(sum(bm.num_blocks_to_reach(s, s.num_tokens + p.max_tokens - 1) for s, p in zip(sessions, plist)))
        requests = [_Request(s, p, seed if seed is not None else self._rng.getrandbits(63))
                    for s, p, seed in zip(sessions, plist, seeds)]
        self._run(sessions, requests=requests, progress=progress, desc="generate")
        return [Completion(r.token_ids, r.logprobs, r.entropies, r.finish_reason or "length", r.session)
                for r in requests]

    def free(self, session: Session) -> None:
        """Release the session's blocks; using it afterwards raises ValueError."""
        self._check_session(session)
        self.block_manager.free(session)
        session.next_logits = None
        session.freed = True

    # -- public surface: snapshots ----------------------------------------------------------------------
    def snapshot(self, session: Session, out: torch.Tensor | None = None) -> KVSnapshot:
        """The session's tokens and KV in (pinned) host memory, restorable here or in another engine.

        ``out``: write the KV there instead of a pooled host buffer (see ``snapshot_async``).
        """
        return self.snapshot_async(session, out=out).wait()

    def snapshot_shape(self, session: Session) -> tuple[int, ...]:
        """The shape of ``session``'s snapshot KV, (n_blocks, L, 2, BS, KVH, D): what ``out=`` must have."""
        self._check_session(session)
        kv = self.kv_cache.kv  # (L, 2, NB, BS, KVH, D)
        return (-(-session.num_computed // self.block_size), *kv.shape[:2], *kv.shape[3:])

    def snapshot_async(self, session: Session, out: torch.Tensor | None = None) -> SnapshotHandle:
        """Start the copy on the engine's copy stream; ``.wait()`` gives the KVSnapshot (blocks are held till then).

        ``out`` (optional): a contiguous tensor of ``snapshot_shape(session)`` and the engine's dtype, on the
        engine's device or in host memory (pinned or registered with CUDA, for an asynchronous copy), that the
        gather writes straight into: e.g. shared memory another process maps, or a device buffer handed to
        another process over CUDA IPC. The snapshot's ``kv`` is then ``out``, which stays the caller's.
        """
        self._check_session(session)
        bs = self.block_size
        num_blocks, num_full = -(-session.num_computed // bs), session.num_computed // bs
        if out is not None and not isinstance(out, torch.Tensor):
            raise TypeError(f"snapshot(out=...) takes a tensor of shape {self.snapshot_shape(session)}; "
                            f"got {type(out).__name__}.")
        block_ids = list(session.block_table[:num_blocks])
        if len(block_ids) != num_blocks or len(session.block_hashes) < num_full:
            raise RuntimeError(
                f"{session!r}: {session.num_computed} computed tokens need {num_blocks} blocks and {num_full} "
                f"hashes; it has {len(block_ids)} and {len(session.block_hashes)}."
            )
        fields = dict(
            fingerprint=dict(self.fingerprint), token_ids=list(session.token_ids),
            num_prompt_tokens=session.num_prompt_tokens, num_computed=session.num_computed,
            block_hashes=list(session.block_hashes[:num_full]), next_logits=session.next_logits,
            weight_version=session.weight_version, weights_digest=self._current_digest(),
        )
        self.block_manager.hold(block_ids)  # held until the copy has read them
        try:
            transfer = self.kv_transfer.snapshot_async(self.kv_cache.kv, block_ids, out=out)
        except Exception:
            self.block_manager.release(block_ids)
            raise
        host_pool = self.kv_transfer.pool if out is None else None
        return SnapshotHandle(transfer, lambda: self.block_manager.release(block_ids), host_pool, fields)

    def restore(self, snapshot: KVSnapshot) -> Session:
        """A new session from a snapshot: cached blocks are shared, the rest written, full blocks join the prefix cache.

        Raises ValueError naming the field when the snapshot comes from another model, dtype, block size or
        weights, and KVCacheExhaustedError when the pool is too small; the pool is unchanged on any error.
        """
        return self.restore_with_stats(snapshot)[0]

    def restore_with_stats(self, snapshot: KVSnapshot) -> tuple[Session, int]:
        """``restore``, and how many of the session's blocks were shared from the prefix cache."""
        if not isinstance(snapshot, KVSnapshot):
            raise ValueError(f"restore() takes a KVSnapshot (from ThawEngine.snapshot or KVSnapshot.load), "
                             f"got {type(snapshot).__name__}.")
        snapshot._check_usable()
        check_fingerprint(snapshot.fingerprint, self.fingerprint)
        self._check_snapshot_weights(snapshot)
        if snapshot.num_tokens >= self.max_model_len:
            raise ValueError(
                f"the snapshot holds {snapshot.num_tokens} tokens, over the target model's context of "
                f"{self.max_model_len} (it needs room for one more token)."
            )
        self.wake_up()
        num_computed = snapshot.num_computed
        if snapshot.next_logits is None and num_computed == snapshot.num_tokens:
            num_computed -= 1  # a live session needs logits or a token to compute; recompute the last one
        self._reserve(self.block_manager.blocks_for(num_computed))
        adoption = self.block_manager.adopt(snapshot, num_computed)
        try:
            if adoption.fresh_positions:
                kv = snapshot.kv
                src = kv if len(adoption.fresh_positions) == snapshot.num_blocks else kv[adoption.fresh_positions]
                self.kv_transfer.restore_async(src, self.kv_cache.kv, adoption.fresh_block_ids).wait()
        except Exception:
            self.block_manager.release(adoption.block_table)
            raise
        logits = snapshot.next_logits if num_computed == snapshot.num_tokens else None
        session = Session(
            engine_id=self._engine_id, token_ids=list(snapshot.token_ids), num_prompt_tokens=snapshot.num_prompt_tokens,
            block_table=adoption.block_table, num_computed=num_computed, weight_version=snapshot.weight_version,
            next_logits=logits.to(self.device, torch.float32, copy=True) if logits is not None else None,
        )
        self.block_manager.register_full(session)
        return session, adoption.num_shared

    # -- internals: checks --------------------------------------------------------------------------------
    def _check_session(self, session: Session) -> None:
        if not isinstance(session, Session):
            raise ValueError(f"expected a Session from ThawEngine.prefill or fork, got {type(session).__name__}.")
        if session.engine_id != self._engine_id:
            raise ValueError(f"{session!r} belongs to another engine; restore a snapshot of it into this one.")
        if session.freed:
            raise ValueError(f"{session!r} was freed; fork it before freeing if you need it again.")

    def _check_prompt(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {self.max_model_len} "
                f"(it needs room for at least one new token). Shorten or truncate the prompt explicitly."
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        need = self.block_manager.blocks_for(len(ids))
        if need > self.max_num_blocks:
            raise KVCacheExhaustedError(
                f"a prompt of {len(ids)} tokens needs {need} KV blocks of {self.block_size} tokens but the pool holds "
                f"{self.max_num_blocks} in all; raise kv_cache_memory to at least "
                f"{(need + 1) * self.spec.bytes_per_block} bytes or shorten the prompt."
            )

    def _check_fits(self, s: Session, max_tokens: int, num_held_outside: int = 0) -> None:
        """Refuse, before sampling, a session whose prompt plus max_tokens cannot fit the context or the pool.

        ``num_held_outside`` blocks are held by sessions outside the call: the call cannot preempt them.
        """
        if s.num_tokens + max_tokens > self.max_model_len:
            raise ValueError(
                f"session {s.session_id} has {s.num_tokens} tokens and max_tokens={max_tokens}, over the "
                f"model's context of {self.max_model_len}. Lower max_tokens to {self.max_model_len - s.num_tokens} "
                f"or shorten the prompt."
            )
        need = self.block_manager.blocks_for(s.num_tokens + max_tokens - 1)  # the last sampled token needs no KV
        room = self.max_num_blocks - num_held_outside
        if need > room:
            fit = room * self.block_size - s.num_tokens + 1
            lower = f"lower max_tokens to {fit}, " if fit >= 1 else ""
            held = (f" of which {num_held_outside} are held by sessions outside this call (free the ones you no "
                    f"longer need)" if num_held_outside else "")
            raise KVCacheExhaustedError(
                f"session {s.session_id} has {s.num_tokens} tokens and max_tokens={max_tokens}: it needs {need} KV "
                f"blocks of {self.block_size} tokens but the pool holds {self.max_num_blocks} in all{held}, so it "
                f"could never finish. Nothing was sampled; {lower}or raise kv_cache_memory to at least "
                f"{(need + num_held_outside + 1) * self.spec.bytes_per_block} bytes."
            )

    def _check_weights(self) -> None:
        """Weights changed in place without ``set_weight_version``: bump the version and drop the cache."""
        digest = weights_digest(self.model)
        if digest != self._weights_digest:
            self.set_weight_version(self.weight_version + 1)

    def _current_digest(self) -> str:
        self._check_weights()
        return self._weights_digest

    def _check_snapshot_weights(self, snapshot: KVSnapshot) -> None:
        digest = self._current_digest()
        if snapshot.weight_version != self.weight_version:
            raise ValueError(
                f"the snapshot's KV was computed with weight version {snapshot.weight_version} but this engine runs "
                f"weight version {self.weight_version}: its KV is stale for these weights. Take the snapshot again "
                f"with the current weights (or, if both engines truly hold the same weights, call "
                f"engine.set_weight_version({snapshot.weight_version}) on this one)."
            )
        if snapshot.weights_digest is not None and snapshot.weights_digest != digest:
            raise ValueError(
                f"the snapshot's KV was computed with other weights than this engine holds (weights digest "
                f"{snapshot.weights_digest} != {digest}, both at weight version {self.weight_version}): another "
                f"checkpoint, or an in-place update. Take the snapshot again from an engine with these weights, and "
                f"call engine.set_weight_version(...) after every weight update."
            )

    # -- internals: pool ----------------------------------------------------------------------------------
    def _reserve(self, num_blocks: int) -> None:
        """Grow a growable pool (default CPU; mapped on demand) so ``num_blocks`` more blocks are free, up to
        its limit."""
        bm = self.block_manager
        if bm.num_free_blocks >= num_blocks or bm.num_blocks >= self._max_num_blocks:
            return
        target = max(2 * bm.num_blocks, bm.num_blocks + num_blocks - bm.num_free_blocks)
        target = min(target, self._max_num_blocks)
        self.kv_cache.grow(target)
        bm.grow(target)

    @property
    def kv_transfer(self) -> KVTransfer:
        """The engine's one KVTransfer (copy stream + pooled pinned host buffers), made on first use."""
        if self._transfer is None:
            from thaw_rl_kernels.host_transfer import KVTransfer

            self._transfer = KVTransfer(self.kv_cache.device)
        return self._transfer

    def _copy_blocks(self, copies: list[tuple[int, int]], num_tokens: int) -> None:
        from thaw_rl_kernels.block_copy import copy_blocks

        dev = self.kv_cache.device
        src = torch.tensor([a for a, _ in copies], dtype=torch.int64, device=dev)
        dst = torch.tensor([b for _, b in copies], dtype=torch.int64, device=dev)
        copy_blocks(self.kv_cache.kv, self.kv_cache.kv, src, dst, num_tokens=num_tokens, check_ids=False)

    # -- internals: the step loop -------------------------------------------------------------------------
    def _run(self, sessions: list[Session], requests: list[_Request] | None, progress: bool, desc: str) -> None:
        """The step loop shared by prefill and generate."""
        if self.runner.refresh_weights():  # the engine's weight copies follow the live parameters every call
            self.invalidate_cuda_graphs()
        by_session = {id(r.session): r for r in requests} if requests is not None else {}
        live = list(sessions)
        total = sum(r.params.max_tokens for r in requests) if requests else sum(s.num_uncomputed for s in sessions)
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        deferred: set[int] = set()  # sessions preempted to let the others finish: back when those are done
        while True:
            # 1) sessions whose next-token logits are already known sample without a forward pass
            if requests is not None:
                ready = [s for s in live if s.num_uncomputed == 0 and s.next_logits is not None]
                if ready:
                    logits = torch.stack([s.next_logits for s in ready])  # (R, V)
                    self._sample([by_session[id(s)] for s in ready], logits)
                    _advance_bar(bar, requests)
                live = [s for s in live if by_session[id(s)].finish_reason is None]
            pending = [s for s in live if s.num_uncomputed > 0]
            if not pending:
                break
            active = [s for s in pending if id(s) not in deferred]
            if not active:  # the sessions kept running are done: the preempted ones are recomputed and go on
                deferred.clear()
                active = pending
            # 2) every active session decodes one token: the async loop runs until they finish (or blocks run out)
            if requests is not None and self._decodes_async(active, by_session):
                if self._decode_steps(active, by_session, requests, bar):
                    continue
                if self._preempt_to_finish(sessions, active, by_session, deferred):  # no step could start: blocks
                    continue
            # 3) one packed forward over prefill chunks and decode tokens
            chunks = self.scheduler.schedule(active)
            if not chunks and self.block_manager.num_blocks < self._max_num_blocks:
                self._reserve(self.block_manager.num_free_blocks + 1)  # a growable pool grows before any preemption
                continue
            if not chunks:
                if requests is None or not self._preempt_to_finish(sessions, active, by_session, deferred):
                    victim = self.scheduler.make_room(sessions, active, generating=requests is not None)
                    deferred.add(id(victim))
                    self._stats.num_preemptions += 1
                continue
            logits = self.runner.forward(chunks)  # (S, V) float32
            self._stats.num_forward_steps += 1
            finished_rows, finished = [], []
            for row, c in enumerate(chunks):
                s = c.session
                self._mark_computed(s, c.start, c.end)
                if s.num_uncomputed == 0:
                    finished_rows.append(row)
                    finished.append(s)
            if requests is None:
                for row, s in zip(finished_rows, finished):
                    s.next_logits = logits[row].clone()
                bar.update(sum(c.num_new for c in chunks))
            elif finished:
                rows = torch.tensor(finished_rows, device=logits.device)
                self._sample([by_session[id(s)] for s in finished], logits.index_select(0, rows))
                _advance_bar(bar, requests)
        bar.close()

    def _preempt_to_finish(self, sessions: list[Session], active: list[Session], by_session: dict[int, _Request],
                           deferred: set[int]) -> bool:
        """Preempt enough of a generate call's sessions that the active ones can run to max_tokens
        (``Scheduler.preempt_to_finish``); the victims wait in ``deferred``. False when none was preempted.
        A growable (CPU) pool grows first, as before any preemption."""
        if self.block_manager.num_blocks < self._max_num_blocks:
            return False  # step 3 grows it
        requests = [by_session[id(s)] for s in active]
        final = [s.num_tokens + max(0, r.params.max_tokens - len(r.token_ids) - 1) for s, r in zip(active, requests)]
        victims = self.scheduler.preempt_to_finish(sessions, active, final)
        deferred.update(id(v) for v in victims)
        self._stats.num_preemptions += len(victims)
        return bool(victims)

    def _mark_computed(self, s: Session, start: int, end: int) -> None:
        """Positions ``[start, end)`` of ``s`` went through a forward (a prefill chunk or one decode token):
        count them, advance the session and register its newly full blocks."""
        if start == 0:
            s.weight_version = self.weight_version  # all of its KV is (re)computed with these weights
        stats = self._stats
        stats.tokens_computed += end - start
        if start < s.num_prompt_tokens:
            stats.prompt_tokens_computed += min(end, s.num_prompt_tokens) - start
        s.num_computed = end
        if end // self.block_size > len(s.block_hashes):  # a block filled up (checked here: 1,024 calls a step)
            self.block_manager.register_full(s)

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        sessions = [r.session for r in reqs]
        batch = SamplingBatch.build(
            params=[r.params for r in reqs],
            seeds=[r.seed for r in reqs],
            positions=[s.num_tokens for s in sessions],
            seen_token_ids=[s.token_ids for s in sessions],
            vocab_size=logits.shape[-1],
            device=logits.device,
        )
        tokens, logprobs, entropies = sample(logits, batch)
        for r, t, lp, ent in zip(reqs, tokens.tolist(), logprobs.tolist(), entropies.tolist()):
            self._record(r, t, lp, ent)

    def _record(self, r: _Request, token: int, logprob: float, entropy: float) -> None:
        """Append one sampled token to its request and session; set finish_reason on a stop or max_tokens."""
        s = r.session
        s.token_ids.append(token)
        s.next_logits = None
        r.token_ids.append(token)
        r.logprobs.append(logprob)
        r.entropies.append(entropy)
        self._stats.tokens_generated += 1
        stop = (token in self.eos_token_ids and not r.params.ignore_eos) or token in r.params.stop_token_ids
        if stop:
            r.finish_reason = "stop"
        elif len(r.token_ids) >= r.params.max_tokens:
            r.finish_reason = "length"

    # -- internals: the async decode loop -----------------------------------------------------------------
    def _decodes_async(self, pending: list[Session], by_session: dict[int, _Request]) -> bool:
        """Whether these sessions can go through the async loop: each has exactly one token to compute
        (no prefill or recompute left) and no repetition penalty (that needs every row's tokens on the host
        each step)."""
        return self.async_decode and all(
            s.num_uncomputed == 1 and s.next_logits is None and by_session[id(s)].params.repetition_penalty == 1.0
            for s in pending)

    def _decode_steps(self, queue: list[Session], by_session: dict[int, _Request], requests: list[_Request],
                      bar) -> bool:
        """Decode ``queue`` with the host one step behind the device; False if no step could start.

        Each iteration prepares and launches step N+1, then processes step N's tokens while the GPU runs
        N+1 (vLLM v1's async scheduling, SGLang's overlap scheduler). Step N+1's input ids are step N's
        sampled tokens, moved on the device (``DecodeBatch``), so the host needs no tokens to launch it.
        The price: a row that stops at step N (eos or a stop id) is found only after N+1 was launched
        with it. Its extra token is dropped in ``_finish_step`` (never returned, never counted) and the
        block allocated for it is released (``BlockManager.trim``): tokens, finish reasons, sessions (tokens,
        computed count, hashes, number of blocks) and stats are those of synchronous steps; block ids may
        differ (the released block goes back to the free queue later than it would have been handed out).
        max_tokens is known ahead and never overrun.

        Rows are taken in queue order up to the step's row and token budgets (as ``Scheduler.schedule``);
        a row that finishes makes room for the next waiting one, one step late after a stop, so a call with
        more rows than ``max_num_seqs`` can take a few more forward steps. When the free blocks cannot cover
        the next step, the loop drains and returns to ``_run``, whose scheduler preempts.
        """
        prof, start = self.decode_profile, time.perf_counter()
        max_rows = min(self.max_num_seqs, self.max_num_batched_tokens)
        batch = DecodeBatch(self.device, self.block_size, self.vocab_size)
        self.runner.cascade.reset()
        waiting = deque(by_session[id(s)] for s in queue)
        inflight: _Step | None = None
        launched = False
        while True:
            t0 = time.perf_counter()
            keep, rows, positions, joining = self._next_rows(inflight, waiting, max_rows)
            new_blocks = self.scheduler.allocate_decode([r.session for r in rows], positions)
            step = None
            if rows and new_blocks is not None:
                base = len(keep)
                cascade = self._cascade_plan(keep, batch.num_rows, rows, positions)
                batch.advance(
                    inflight.sampled if inflight is not None else None, keep,
                    [(r.session.token_ids[-1], positions[base + k], r.session.block_table, r.params, r.seed)
                     for k, r in enumerate(joining)],
                    new_blocks)
                t1 = time.perf_counter()
                step = self._launch(batch, rows, positions, cascade)
                if prof is not None:
                    prof.steps += 1
                    prof.rows += len(rows)
                    prof.prepare += t1 - t0
                    prof.launch += time.perf_counter() - t1
                    prof.first_prepare += 0.0 if launched else t1 - t0
                launched = True
            else:
                waiting.extendleft(reversed(joining))
            if inflight is not None:  # the previous step's tokens, while the device runs this one
                processed = prof.process if prof is not None else 0.0
                self._finish_step(inflight, bar, requests)
                if prof is not None and step is None:
                    prof.last_process += prof.process - processed
            inflight = step
            if step is None:
                if prof is not None:
                    prof.runs += 1
                    prof.loop += time.perf_counter() - start
                return launched

    @staticmethod
    def _next_rows(inflight: _Step | None, waiting: deque[_Request], max_rows: int
                   ) -> tuple[list[int], list[_Request], list[int], list[_Request]]:
        """The next step's rows: the in-flight rows that may go on (their indices ``keep``), then waiting
        ones in queue order up to ``max_rows`` (``joining``, taken off ``waiting``); with input positions.

        An in-flight row goes on unless it is known to have stopped or its in-flight token is its last
        (max_tokens is known ahead; a stop is known one step late and costs that row one dropped token).
        """
        keep, rows, positions = [], [], []
        if inflight is not None:
            for i, (r, p) in enumerate(zip(inflight.rows, inflight.positions)):
                if r.finish_reason is None and len(r.token_ids) + 1 < r.params.max_tokens:  # +1: the in-flight token
                    keep.append(i)
                    rows.append(r)
                    positions.append(p + 1)
        joining = []
        while waiting and len(rows) < max_rows:
            r = waiting.popleft()
            joining.append(r)
            rows.append(r)
            positions.append(r.session.num_computed)
        return keep, rows, positions, joining

    def _cascade_plan(self, keep: list[int], num_prev: int, rows: list[_Request], positions: list[int]):
        """The next async step's cascade plan (engine/cascade.py), or None (off, nothing shared, not worth it)."""
        graph_step = not self.runner.decodes_eagerly(len(rows))
        return self.runner.cascade.advance(keep, num_prev, [r.session.block_table for r in rows],
                                           [p + 1 for p in positions], graph_step=graph_step)

    def _launch(self, batch: DecodeBatch, rows: list[_Request], positions: list[int], cascade=None) -> _Step:
        """Queue the forward and the sampler on the device and start the tokens' late copy; nothing waits."""
        width = max(positions) // self.block_size + 1  # table columns in use (as pack() gives)
        logits = self.runner.forward_decode(batch.input_ids, batch.positions, batch.block_tables[:, :width],
                                            cascade=cascade)
        tokens, logprobs, entropies = sample(logits, batch.sampling_for_step())  # (n,) each, on the device
        return _Step(rows, positions, tokens, LateTokens(tokens, logprobs, entropies))

    def _finish_step(self, step: _Step, bar, requests: list[_Request]) -> None:
        """Record an async step's tokens (waiting for them if the device is still on it)."""
        prof, bm = self.decode_profile, self.block_manager
        t0 = time.perf_counter()
        tokens, logprobs, entropies = step.tokens.wait()
        t1 = time.perf_counter()
        kept = False
        for r, p, t, lp, ent in zip(step.rows, step.positions, tokens, logprobs, entropies):
            if r.finish_reason is not None:
                continue  # it stopped the step before: this token was computed speculatively and is dropped
            kept = True
            s = r.session
            self._mark_computed(s, p, p + 1)
            self._record(r, t, lp, ent)
            if r.finish_reason is not None:
                bm.trim(s)  # the block allocated for its next (never to come) token, if any
        if kept:
            self._stats.num_forward_steps += 1
        _advance_bar(bar, requests)
        if prof is not None:
            prof.wait += t1 - t0
            prof.process += time.perf_counter() - t1

