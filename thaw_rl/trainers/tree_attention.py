"""The training attention for packed token trees, registered with transformers' ``AttentionInterface``.

``thaw_tree`` is SDPA for every ordinary forward and takes a tree mask when one is passed as the 4D
``attention_mask`` of a packed forward (transformers returns a prepared 4D mask or ``BlockMask`` as is):

- a dense ``(1, 1, N, N)`` bool mask runs through SDPA (the CPU path, the reference, and short packs on
  CUDA);
- a FlexAttention ``BlockMask`` runs through ``flex_attention`` (long packs on CUDA: the block mask skips
  the tiles a token tree never attends, e.g. sibling completions; ``FLEX_MIN_TOKENS`` says where).

Why a registered implementation rather than switching the model to ``flex_attention`` around the packed
call: with gradient checkpointing the decoder layers run their forward again during backward, after any
``with`` block around the call has closed, and they look the attention function up by
``config._attn_implementation`` at that moment. So the trainer sets ``thaw_tree`` for the whole of
``train()`` (``tree_attention_mode``); ``thaw_tree`` behaves as SDPA (with SDPA's mask function) for
everything that is not a packed tree, so nothing else changes while it is set.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "thaw_tree"
MASK_KINDS = ("auto", "dense", "flex")

_mode_lock = threading.Lock()


def thaw_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, or FlexAttention when ``attention_mask`` is a ``BlockMask`` (query ``(B, H, T, D)``)."""
    if _is_block_mask(attention_mask):
        out = _compiled_flex_attention()(query, key, value, block_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])  # (B, H, T, D)
        return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask"


_flex = None


def _compiled_flex_attention():
    """``flex_attention`` compiled once with automatic dynamic shapes.

    Not transformers' wrapper: it compiles with ``dynamic=False``, and a packed tree's length changes with
    every micro-batch, so each batch would recompile until dynamo's recompile limit sends it to the
    eager fallback (which materializes the scores). Lengths are also padded to ``FLEX_PAD`` tokens.
    """
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention)
    return _flex


FLEX_PAD = 128  # flex's block size: packed lengths are padded to a multiple of it (shared_prefix.pad_multiple)


AttentionInterface.register(ATTENTION_NAME, thaw_tree_attention)
AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def tree_attention_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Route the models' attention through ``thaw_tree`` inside the block, then restore each one.

    Re-entrant: a model already in ``thaw_tree`` mode is left as it is (and not restored by the inner block).
    """
    changed = []
    with _mode_lock:
        for model in models:
            config = getattr(model, "config", None)
            if config is None or config._attn_implementation == ATTENTION_NAME:
                continue
            changed.append((config, config._attn_implementation))
            config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _mode_lock:
            for config, previous in reversed(changed):
                config._attn_implementation = previous


# Measured on an H200 (benchmarks/results/packed_training_h200_qwen2.5-1.5b.json, Qwen2.5-1.5B shape, bf16, forward +
# backward with checkpointing): at 4,228 packed tokens the dense mask ran 202 ms and flex 241 ms; at 9,918
# tokens dense 615 ms and flex 409 ms. Flex skips the tiles a tree never attends, which pays once the
# attention's N^2 term matters; below that its block-sparse launch costs more than SDPA's masked kernel.
FLEX_MIN_TOKENS = 6144


def resolve_mask_kind(kind: str, device: torch.device, num_tokens: int = 0) -> str:
    """``auto``: ``flex`` on CUDA for packs of ``FLEX_MIN_TOKENS`` tokens or more, else ``dense``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"shared_prefix_attention={kind!r}: use one of {MASK_KINDS}.")
    if kind == "auto":
        return "flex" if device.type == "cuda" and num_tokens >= FLEX_MIN_TOKENS else "dense"
    return kind


def sliding_window_of(config) -> tuple[int | None, bool]:
    """(window, per_layer): the model's attention window, and whether only some layers use it.

    Mistral windows every layer (``sliding_window`` set); Qwen2/Qwen3 window the layers whose
    ``layer_types`` entry is ``sliding_attention`` (``use_sliding_window``, ``max_window_layers``).
    """
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return (window, True) if window and "sliding_attention" in layer_types else (None, False)
    return (window or None), False


def tree_attention_mask(subtree_end: torch.Tensor, kind: str, positions: torch.Tensor | None = None,
                        window: int | None = None):
    """The 4D mask of a pre-order token tree: key k is visible to query q iff ``k <= q < subtree_end[k]``,
    and, with a sliding ``window``, ``positions[q] - positions[k] < window`` (HF's window: the last
    ``window`` positions of the query's own path).

    ``dense``: ``(1, 1, N, N)`` bool for SDPA. ``flex``: a FlexAttention ``BlockMask`` of the same rule.
    """
    if window is not None and positions is None:
        raise ValueError("a sliding-window tree mask needs the tokens' positions")
    n = subtree_end.numel()
    if kind == "dense":
        idx = torch.arange(n, device=subtree_end.device)
        visible = (idx[None, :] <= idx[:, None]) & (idx[:, None] < subtree_end[None, :])  # (N, N)
        if window is not None:
            visible &= (positions[:, None] - positions[None, :]) < window
        return visible[None, None]
    if kind == "flex":
        return tree_block_mask(subtree_end, positions=positions, window=window)
    raise ValueError(f"mask kind {kind!r}: use 'dense' or 'flex'.")


def tree_block_mask(subtree_end: torch.Tensor, block_size: int = 128, positions: torch.Tensor | None = None,
                    window: int | None = None):
    """The tree's FlexAttention ``BlockMask``, computed from ``subtree_end`` per block, with no compile.

    ``create_block_mask`` evaluates the mask for every (q, k) pair, and compiled it recompiled inside
    training (seen on the H200: minutes per micro-batch). A pre-order tree needs only two numbers per key
    block j: the keys of block j are visible exactly to queries in ``[j * bs, max(subtree_end[block j]))``
    (each key sees its own subtree, and consecutive keys' subtrees leave no gap), and to all of query
    block i when ``j < i`` and ``min(subtree_end[block j]) >= (i + 1) * bs``. Partial blocks apply the
    same rule per element through ``mask_mod``. ``N`` must be a multiple of ``block_size``. With a sliding
    ``window`` no block is full (positions are not monotonic in pre-order): every visible block is partial.

    The four block lists (kv and q, partial and full) come from one sort of the ``(nb, nb)`` flags and
    its transpose: the same tensors ``BlockMask.from_kv_blocks`` derives, without its scatter/vmap
    transposes (fewer launches: this runs once per micro-batch on the host's critical path). It is
    computed where ``subtree_end`` lies and reads no value back, so it never waits for a device (the
    trainer's ``PackAhead`` moves packs with ``PackedBatch.to`` and builds their masks on the device).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = subtree_end.numel()
    if n % block_size:
        raise ValueError(f"{n} tokens: pad the packed tree to a multiple of {block_size} for a block mask")
    blocks = n // block_size
    ends = subtree_end.view(blocks, block_size)
    reach, floor = ends.max(dim=1).values, ends.min(dim=1).values  # (nb,): per key block
    q_block = torch.arange(blocks, device=subtree_end.device)[:, None]  # (nb, 1)
    k_block = q_block.T  # (1, nb)
    any_visible = (k_block <= q_block) & (reach[None, :] > q_block * block_size)  # (nb, nb)
    full = (k_block < q_block) & (floor[None, :] >= (q_block + 1) * block_size)
    if window is not None:
        full = torch.zeros_like(full)
    partial = any_visible & ~full
    flags = torch.stack([partial, full, partial.T, full.T])  # (4, nb, nb): kv lists, then q lists
    counts = flags.sum(dim=2, dtype=torch.int32)[:, None, None]  # (4, 1, 1, nb)
    # flagged columns first, each group in index order (what from_kv_blocks' stable argsort gives)
    order = torch.argsort((~flags).to(torch.int8), dim=2, stable=True).to(torch.int32)  # (4, nb, nb)
    order = order[:, None, None]  # (4, 1, 1, nb, nb)
    end = subtree_end

    def ancestor_or_self(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < end[kv_idx])

    def ancestor_in_window(b, h, q_idx, kv_idx):
        return ancestor_or_self(b, h, q_idx, kv_idx) & (positions[q_idx] - positions[kv_idx] < window)

    # each list its own tensor, as from_kv_blocks makes them (a view's storage offset is one more thing
    # the compiled flex_attention would guard on)
    counts, order = [t.clone() for t in counts.unbind(0)], [t.clone() for t in order.unbind(0)]
    return BlockMask(seq_lengths=(n, n), kv_num_blocks=counts[0], kv_indices=order[0],
                     full_kv_num_blocks=counts[1], full_kv_indices=order[1],
                     q_num_blocks=counts[2], q_indices=order[2],
                     full_q_num_blocks=counts[3], full_q_indices=order[3], BLOCK_SIZE=(block_size, block_size),
                     mask_mod=ancestor_or_self if window is None else ancestor_in_window)

