"""The transformers attention hook that runs an unmodified HF model over the paged KV cache.

We register ``thaw_paged`` with transformers' ``AttentionInterface``. The engine switches the model's
``config._attn_implementation`` to it only for the duration of its own forward passes (see
``paged_attention_mode``), and passes the per-step metadata as the ``thaw_attention`` kwarg, which HF
forwards unchanged from ``model(...)`` down to every attention call. Because ``thaw_paged`` is not a
registered *mask* function, HF's masking utilities return early and no O(T^2) mask is built. Outside the
engine the model keeps its own attention implementation, so the same object trains as usual; if our hook
is ever called without metadata (a user set it by hand), it falls back to SDPA.

The hook is excluded from torch.compile: it writes the new K/V into the cache in place, which inductor
would functionalise into a copy of the whole cache (seen: a 37 GiB allocation). The engine's
``compile_layers`` option compiles everything around it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from thaw_rl.engine.kv_cache import PagedKVCache
from thaw_rl_kernels.cascade_attention import cascade_attention
from thaw_rl_kernels.cascade_plan import CascadePlan
from thaw_rl_kernels.kv_write import write_kv
from thaw_rl_kernels.paged_attention import paged_attention

ATTENTION_NAME = "thaw_paged"
METADATA_KWARG = "thaw_attention"


@dataclass
class AttentionMetadata:
    """Everything one packed forward needs to read and write the paged cache (one per engine step)."""

    kv_cache: PagedKVCache
    slot_blocks: torch.Tensor  # (T,) int64: block of each new token
    slot_offsets: torch.Tensor  # (T,) int64: offset inside that block
    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32: context incl. new tokens
    cu_seqlens_q: torch.Tensor  # (S+1,) int32
    max_seqlen_q: int
    cascade: CascadePlan | None = None  # pure-decode steps only: rows sharing leading blocks (engine/cascade.py)


@torch.compiler.disable
def thaw_paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, D), RoPE applied
    key: torch.Tensor,  # (1, KVH, T, D)
    value: torch.Tensor,  # (1, KVH, T, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta: AttentionMetadata | None = kwargs.get(METADATA_KWARG)
    if meta is None:
        _refuse_forward_during_engine_forward(module)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"thaw_paged expects one packed row, got batch {query.shape[0]}")
    layer = module.layer_idx
    k_cache = meta.kv_cache.key_cache(layer)  # (NB, BS, KVH, D)
    v_cache = meta.kv_cache.value_cache(layer)
    # (T, KVH, D) views, no copy; one launch writes K and V on CUDA (kv_write.py)
    write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta.slot_blocks, meta.slot_offsets)
    q = query[0].transpose(0, 1)  # (T, H, D)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    if meta.cascade is not None and not window:  # a shared prefix read once per group (cascade off in windows)
        out = cascade_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cascade, scale)
        return out[None], None  # (1, T, H, D)
    out = paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.max_seqlen_q, scale,
        sliding_window=window,  # HF passes the layer's window (Mistral, Qwen2/3 sliding layers)
    )  # (T, H, D)
    return out[None], None  # (1, T, H, D)


AttentionInterface.register(ATTENTION_NAME, thaw_paged_attention)


def _refuse_forward_during_engine_forward(module: torch.nn.Module) -> None:
    """A plain forward from another thread while an engine forward holds the model: it would see thaw_paged."""
    owner = _ENGINE_THREADS.get(id(getattr(module, "config", None)))
    if owner is not None and owner != threading.get_ident():
        raise RuntimeError(
            "this model ran a forward in one thread while a ThawEngine forward on it was running in another: the "
            "model's attention was switched to the engine's, so this forward would have been wrong (its padding "
            "ignored). Serialize them: wrap the other forward in `with thaw_rl.engine.attention.model_lock(model):`.")


# One lock per model object: the switch below mutates the shared config, so two engines on one model (two
# threads) would otherwise interleave it and leave the model in thaw_paged mode (wrong padded forwards after).
_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
_ENGINE_THREADS: dict[int, int] = {}  # id(model.config) -> the thread running an engine forward on that model


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock serializing every forward of ``model`` with its engine forwards (one per model).

    Made when the first engine is built on the model, which also makes the model's own forwards take it (see
    ``_serialize_forwards``), so a training forward in another thread waits for an engine step to finish.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
            _serialize_forwards(model, lock)
        return lock


def _serialize_forwards(model: torch.nn.Module, lock: threading.RLock) -> None:
    """Forward hooks holding ``lock`` around each forward of the model and of its decoder (TRL's fused LM head
    calls the decoder directly): while an engine forward has switched the shared config to thaw_paged, a
    forward from another thread would build no padding mask and attend wrongly. Python-only, no device work."""

    @torch.compiler.disable
    def acquire(module, args) -> None:
        lock.acquire()

    @torch.compiler.disable
    def release(module, args, output) -> None:
        try:
            lock.release()
        except RuntimeError:  # an earlier pre-hook raised before ours acquired: keep that error, not this one
            pass

    for module in {id(m): m for m in (model, getattr(model, "base_model", model))}.values():
        module.register_forward_pre_hook(acquire)
        module.register_forward_hook(release, always_call=True)


@contextlib.contextmanager
def paged_attention_mode(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through ``thaw_paged`` inside the block, then restore it.

    Holds ``model_lock(model)`` for the whole block, so forwards of several engines on one model run one
    at a time and each restores exactly what it found.
    """
    with model_lock(model):
        config = model.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        outermost = id(config) not in _ENGINE_THREADS  # else this thread re-entered (the lock is ours)
        _ENGINE_THREADS[id(config)] = threading.get_ident()
        try:
            yield
        finally:
            config._attn_implementation = previous
            if outermost:
                del _ENGINE_THREADS[id(config)]
