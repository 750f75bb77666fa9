"""ThawEngine: prefill a prompt once, fork its KV copy-on-write, and generate many continuations.

The engine runs the caller's own HF model object (no weight copy: a trainer generates with its live
weights) through transformers' attention hook (``attention.py``) over a paged KV cache
(``kv_cache.py``) whose blocks are refcounted by ``BlockPool``. A fork shares every full block of the
parent and copies only its partial last block, so it costs O(blocks), not O(tokens x layers).

Scheduling is continuous batching in one loop: each step packs prefill chunks and decode tokens of many
sessions into one forward (bounded by ``max_num_batched_tokens``), then samples for every session whose
logits are ready. When the KV pool is full, the most recently admitted session of the call is
preempted (its blocks released) and recomputed later; its sampled tokens are kept and, because the
sampling noise is a function of (seed, position), it continues exactly as it would have. A single
session that cannot fit even alone raises ``KVCacheExhaustedError``: nothing is truncated silently.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from thaw_rl.engine.block_pool import BlockPool, hash_block_tokens
from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache
from thaw_rl.engine.model_runner import Chunk, ModelRunner
from thaw_rl.engine.sampling import SamplingBatch, SamplingParams, derive_seed, sample
from thaw_rl.engine.session import Session
from thaw_rl.engine.sharding import compute_dtype

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class KVCacheExhaustedError(ValueError):
    """The KV pool cannot hold what was asked, even after preempting everything it may preempt."""


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


@dataclass
class _Request:
    """One session inside a ``generate`` call."""

    session: Session
    params: SamplingParams
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def _tokens_done(requests: list[_Request]) -> int:
    """Progress of a generate call in tokens: a finished request counts its whole max_tokens (an early stop
    leaves nothing more to do), so the bar reaches 100% when the call ends."""
    return sum(r.params.max_tokens if r.finish_reason else len(r.token_ids) for r in requests)


def _model_dims(config) -> tuple[int, int, int]:
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


class ThawEngine:
    """Paged-KV generation with copy-on-write fork over an unmodified HF causal LM."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        block_size: int = 16,
        kv_cache_memory: int | float | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 256,
        layout: str = "layer_major",
        use_cuda_graphs: bool | None = None,
        compile_layers: bool = False,
        seed: int | None = None,
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ThawEngine does not support model_type {config.model_type!r}: its attention hook is tested on "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only causal LMs with full attention). Use one of "
                f"those families, or generate this model with model.generate."
            )
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError(
                f"{config.model_type} with use_sliding_window=True is not supported (the paged kernel attends "
                f"to the full context). Set config.use_sliding_window=False."
            )
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two (e.g. 16).")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(model)  # FSDP2 mixed precision computes in bf16 over fp32 shards
        num_layers, num_kv_heads, head_dim = _model_dims(config)
        self.spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, self.dtype)
        self.block_size = block_size
        self.max_model_len = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.vocab_size = config.vocab_size
        num_blocks = self._num_blocks(kv_cache_memory)
        self.pool = BlockPool(num_blocks)
        self.kv_cache = PagedKVCache(self.spec, num_blocks, self.device, layout)
        self.max_num_batched_tokens = max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        self.max_num_seqs = max_num_seqs
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        self.runner = ModelRunner(
            model, self.kv_cache, use_cuda_graphs=use_cuda_graphs, max_num_seqs=max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // block_size), compile_layers=compile_layers,
        )
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.fingerprint = self._fingerprint(config)
        self._hash_salt = json.dumps(self.fingerprint, sort_keys=True).encode()
        self._rng = random.Random(seed)
        self._engine_id = id(self)
        self._stats = EngineStats()

    # -- construction helpers -------------------------------------------------------------------------
    def _num_blocks(self, kv_cache_memory: int | float | None) -> int:
        bytes_per_block = self.spec.bytes_per_block
        if kv_cache_memory is None:
            kv_cache_memory = 0.5 if self.device.type == "cuda" else 512 * 2**20
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
        return num_blocks

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
        """What KV computed by this engine depends on; snapshots carry it and restores compare it."""
        s = self.spec
        arch = (getattr(config, "architectures", None) or [type(self.model).__name__])[0]
        return {
            "architecture": arch, "model_type": config.model_type, "num_layers": s.num_layers,
            "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "dtype": str(s.dtype).replace("torch.", ""), "block_size": s.block_size,
        }

    # -- public surface -----------------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        st = self._stats
        st.num_blocks = self.pool.num_blocks - 1
        st.num_free_blocks = self.pool.num_free_blocks
        st.num_used_blocks = self.pool.num_used_blocks
        st.num_cached_blocks = self.pool.num_cached_blocks
        return EngineStats(**vars(st))

    def reset_stats(self) -> None:
        self._stats = EngineStats()

    def reset_prefix_cache(self) -> None:
        """Call after the weights change: cached KV was computed with the old weights."""
        self.pool.reset_prefix_cache()

    def prefill(self, prompt_token_ids: Sequence[int]) -> Session:
        """Compute a prompt's KV (reusing cached prefix blocks) and keep the next-token logits."""
        return self.prefill_many([prompt_token_ids])[0]

    def prefill_many(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> list[Session]:
        """Prefill several prompts in packed steps (one forward can hold many prompts)."""
        sessions = [self._new_session(p) for p in prompts]
        self._run(sessions, requests=None, progress=progress, desc="prefill")
        return sessions

    def fork(self, session: Session, n: int, at: int | None = None) -> list[Session]:
        """n children that share the parent's full blocks; each gets its own copy of the partial block.

        ``at`` forks at an earlier token position (children keep ``token_ids[:at]``), which is how tree
        methods branch at a high-entropy token inside a segment. A child whose last token's logits are
        not known keeps that token uncomputed, so its first step recomputes one token instead of
        writing into a block that other sessions share.
        """
        self._check_session(session)
        if n < 1:
            raise ValueError(f"fork(n={n}): n must be >= 1.")
        at = session.num_tokens if at is None else at
        if not 1 <= at <= session.num_tokens:
            raise ValueError(f"fork(at={at}) must be in [1, {session.num_tokens}] (the session's token count).")
        start = time.perf_counter()
        bs = self.block_size
        keep_logits = at == session.num_tokens and session.next_logits is not None
        computed = min(at, session.num_computed)
        if computed == at and not keep_logits:
            computed = at - 1
        num_full, partial = divmod(computed, bs)
        if partial and not self.pool.can_allocate(n):
            raise KVCacheExhaustedError(
                f"fork(n={n}) needs {n} free KV blocks for the children's partial blocks but only "
                f"{self.pool.num_free_blocks} are free. Free sessions you no longer need or raise kv_cache_memory."
            )
        children = []
        for _ in range(n):
            self.pool.share(session.block_table[:num_full])
            table = list(session.block_table[:num_full])
            if partial:
                table.append(self.pool.allocate(1)[0])
            children.append(Session(
                engine_id=self._engine_id, token_ids=session.token_ids[:at],
                num_prompt_tokens=min(session.num_prompt_tokens, at), block_table=table,
                block_hashes=session.block_hashes[:num_full], num_computed=computed,
                next_logits=session.next_logits if keep_logits else None, parent_id=session.session_id,
            ))
        if partial:
            self._copy_partial(session.block_table[num_full], [c.block_table[num_full] for c in children], partial)
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

        With one ``SamplingParams`` carrying a seed, session i samples with ``derive_seed(seed, i)`` so
        forked children differ from one another and the call is reproducible.
        """
        sessions = list(sessions)
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("generate() got the same session twice; fork it to get independent children.")
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(sessions)
        if len(plist) != len(sessions):
            raise ValueError(f"generate() got {len(plist)} SamplingParams for {len(sessions)} sessions.")
        requests = []
        for i, (s, p) in enumerate(zip(sessions, plist)):
            self._check_session(s)
            if s.num_tokens + p.max_tokens > self.max_model_len:
                raise ValueError(
                    f"session {s.session_id} has {s.num_tokens} tokens and max_tokens={p.max_tokens}, over the "
                    f"model's context of {self.max_model_len}. Lower max_tokens to {self.max_model_len - s.num_tokens} "
                    f"or shorten the prompt."
                )
            seed = derive_seed(p.seed, i) if p.seed is not None else self._rng.getrandbits(63)
            requests.append(_Request(s, p, seed))
        self._run(sessions, requests=requests, progress=progress, desc="generate")
        return [Completion(r.token_ids, r.logprobs, r.entropies, r.finish_reason or "length", r.session) for r in requests]

    def free(self, session: Session) -> None:
        """Release the session's blocks; using it afterwards raises ValueError."""
        self._check_session(session)
        self.pool.release(session.block_table)
        session.block_table = []
        session.next_logits = None
        session.freed = True

    def snapshot(self, session: Session) -> "KVSnapshot":  # noqa: F821 (thaw_rl.snapshot imports this module)
        """The session's tokens and KV in (pinned) host memory, restorable here or in another engine."""
        return self.snapshot_async(session).wait()

    def snapshot_async(self, session: Session) -> "SnapshotHandle":  # noqa: F821
        """Start the copy on the engine's copy stream; ``.wait()`` gives the KVSnapshot (the blocks are held till then)."""
        from thaw_rl.snapshot import snapshot_session_async

        return snapshot_session_async(self, session)

    def restore(self, snapshot: "KVSnapshot") -> Session:  # noqa: F821
        """A new session from a snapshot: cached blocks are shared, the rest written, full blocks join the prefix cache.

        Raises ValueError naming the field when the snapshot comes from another model, dtype or block size, and
        KVCacheExhaustedError when the pool is too small; the pool is unchanged on any error.
        """
        from thaw_rl.snapshot import restore_session

        return restore_session(self, snapshot)[0]

    # -- internals --------------------------------------------------------------------------------------
    def _check_session(self, session: Session) -> None:
        if not isinstance(session, Session):
            raise ValueError(f"expected a Session from ThawEngine.prefill or fork, got {type(session).__name__}.")
        if session.engine_id != self._engine_id:
            raise ValueError(f"{session!r} belongs to another engine; restore a snapshot of it into this one.")
        if session.freed:
            raise ValueError(f"{session!r} was freed; fork it before freeing if you need it again.")

    def _new_session(self, prompt: Sequence[int]) -> Session:
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token id (e.g. the BOS token or a chat template).")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {self.max_model_len} "
                f"(it needs room for at least one new token). Shorten or truncate the prompt explicitly."
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        session = Session(engine_id=self._engine_id, token_ids=ids, num_prompt_tokens=len(ids))
        self._match_prefix(session)
        return session

    def _match_prefix(self, session: Session) -> None:
        """Share the longest run of cached full blocks; the last token is always left to compute."""
        bs = self.block_size
        parent = None
        for i in range((session.num_tokens - 1) // bs):
            h = hash_block_tokens(parent, session.token_ids[i * bs:(i + 1) * bs], self._hash_salt)
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            self.pool.share([block_id])
            session.block_table.append(block_id)
            session.block_hashes.append(h)
            parent = h
        session.num_computed = len(session.block_table) * bs
        self._stats.prompt_tokens_reused += session.num_computed

    def _register_full_blocks(self, session: Session) -> None:
        bs = self.block_size
        for i in range(len(session.block_hashes), session.num_computed // bs):
            parent = session.block_hashes[-1] if session.block_hashes else None
            h = hash_block_tokens(parent, session.token_ids[i * bs:(i + 1) * bs], self._hash_salt)
            self.pool.register_full(session.block_table[i], h)
            session.block_hashes.append(h)

    def _copy_partial(self, src_block: int, dst_blocks: list[int], num_tokens: int) -> None:
        from thaw_rl_kernels.block_copy import copy_blocks

        dev = self.kv_cache.device
        src = torch.tensor([src_block] * len(dst_blocks), dtype=torch.int64, device=dev)
        dst = torch.tensor(dst_blocks, dtype=torch.int64, device=dev)
        copy_blocks(self.kv_cache.kv, self.kv_cache.kv, src, dst, num_tokens=num_tokens, check_ids=False)

    def _preempt(self, session: Session) -> None:
        """Drop a session's KV; its tokens stay and are recomputed later.

        It does not re-match the prefix cache here: its own blocks were just freed and are still
        cached, so re-sharing them would free nothing and livelock the scheduler.
        """
        self.pool.release(session.block_table)
        session.block_table = []
        session.block_hashes = []
        session.num_computed = 0
        session.next_logits = None
        self._stats.num_preemptions += 1

    def _schedule(self, pending: list[Session]) -> list[Chunk]:
        """Pick chunks for one step within the token budget, allocating their blocks (may preempt)."""
        bs = self.block_size
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        for s in pending:
            if budget <= 0 or len(chunks) >= self.max_num_seqs:
                break
            n = min(s.num_uncomputed, budget)
            need = -(-(s.num_computed + n) // bs) - len(s.block_table)
            if need > self.pool.num_free_blocks:
                n_fit = (len(s.block_table) + self.pool.num_free_blocks) * bs - s.num_computed
                if n_fit <= 0:
                    break
                n, need = n_fit, self.pool.num_free_blocks
            if need:
                s.block_table.extend(self.pool.allocate(need))
            chunks.append(Chunk(s, n))
            budget -= n
        return chunks

    def _run(self, sessions: list[Session], requests: list[_Request] | None, progress: bool, desc: str) -> None:
        """The step loop shared by prefill and generate."""
        by_session = {id(r.session): r for r in requests} if requests is not None else {}
        live = list(sessions)
        total = sum(r.params.max_tokens for r in requests) if requests else sum(s.num_uncomputed for s in sessions)
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        while True:
            # 1) sessions whose next-token logits are already known sample without a forward pass
            if requests is not None:
                ready = [s for s in live if s.num_uncomputed == 0 and s.next_logits is not None]
                if ready:
                    logits = torch.stack([s.next_logits for s in ready])  # (R, V)
                    self._sample([by_session[id(s)] for s in ready], logits)
                    bar.update(_tokens_done(requests) - bar.n)
                live = [s for s in live if by_session[id(s)].finish_reason is None]
            pending = [s for s in live if s.num_uncomputed > 0]
            if not pending:
                break
            # 2) one packed forward over prefill chunks and decode tokens
            chunks = self._schedule(pending)
            if not chunks:
                self._make_room(sessions, pending, generating=requests is not None)
                continue
            logits = self.runner.forward(chunks)  # (S, V) float32
            self._stats.num_forward_steps += 1
            finished_rows, finished = [], []
            for row, c in enumerate(chunks):
                s = c.session
                self._stats.tokens_computed += c.num_new
                self._stats.prompt_tokens_computed += max(0, min(c.end, s.num_prompt_tokens) - c.start)
                s.num_computed = c.end
                self._register_full_blocks(s)
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
                bar.update(_tokens_done(requests) - bar.n)
        bar.close()

    def _make_room(self, sessions: list[Session], pending: list[Session], generating: bool) -> None:
        """No chunk fit: drop the KV of one session of this call, or give up with a clear error.

        Victims, in order: sessions of a generate call that already finished (their tokens are kept and
        their KV is recomputed if they are ever continued), then the most recently admitted pending
        ones. The head of the queue is never preempted, so every round makes progress. A prefill call
        never drops a finished prompt (its KV is the result), so it raises when the prompts cannot fit.
        """
        waiting = {id(s) for s in pending}
        finished = [s for s in reversed(sessions) if id(s) not in waiting and s.block_table] if generating else []
        victims = finished + [s for s in reversed(pending[1:]) if s.block_table]
        if not victims:
            head = pending[0]
            need = -(-(head.num_tokens) // self.block_size)
            raise KVCacheExhaustedError(
                f"KV pool exhausted: {head!r} needs {need} blocks of {self.block_size} tokens and only "
                f"{self.pool.num_free_blocks} of {self.pool.num_blocks - 1} are free (the rest are held by other "
                f"sessions). Free sessions you no longer need, generate fewer sessions at once, or raise kv_cache_memory."
            )
        self._preempt(victims[0])

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
        for r, s, t, lp, ent in zip(reqs, sessions, tokens.tolist(), logprobs.tolist(), entropies.tolist()):
            s.token_ids.append(t)
            s.next_logits = None
            r.token_ids.append(t)
            r.logprobs.append(lp)
            r.entropies.append(ent)
            self._stats.tokens_generated += 1
            stop = (t in self.eos_token_ids and not r.params.ignore_eos) or t in r.params.stop_token_ids
            if stop:
                r.finish_reason = "stop"
            elif len(r.token_ids) >= r.params.max_tokens:
                r.finish_reason = "length"
