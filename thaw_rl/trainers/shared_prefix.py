"""Shared-prefix training: TRL's per-token scoring pass over packed token trees instead of padded rows.

Every training-side forward of GRPOTrainer goes through one method,
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size, ...)``:
the loss forward (with grad), the old-policy logprobs and the reference model's. ``packed_logps`` is
its packed equivalent: the rows are packed into token trees (``prefix_packing.pack_rows``), each tree
runs once through the model's own forward with the tree mask (``tree_attention``) and TRL's fused LM
head scoring each packed position against its one next token (``shift_labels``), and the per-position
log-probabilities and entropies are read back into TRL's ``(B, T)`` layout. Sliding-window models
(Mistral; Qwen2/Qwen3 sliding layers, as a ``layer_types`` mask mapping) get the window in the tree
mask, measured along each token's own path. The loss code downstream
(every loss type, importance sampling, masking, entropy filtering) is TRL's, on the same numbers.

``GroupShuffle``: TRL shuffles a generation batch row by row before splitting it into micro-batches,
which would scatter a group's rows over micro-batches and leave little to share. With packing on, the
trainer shuffles whole groups instead (the order of groups is random; a group's rows stay together).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from thaw_rl.trainers.prefix_packing import PackedBatch, pack_rows
from thaw_rl.trainers.tree_attention import (
    FLEX_PAD,
    resolve_mask_kind,
    sliding_window_of,
    tree_attention_mask,
    tree_attention_mode,
)


@dataclass
class PackedScores:
    logps: torch.Tensor  # (B, T)
    entropies: torch.Tensor | None  # (B, T)
    batch: PackedBatch


@dataclass
class ReadyChunk:
    """One packed forward's inputs on the device: the chunk padded (``padded_tree``) and its attention mask."""

    input_ids: torch.Tensor  # (N',) N' = N padded
    position_ids: torch.Tensor  # (N',)
    shift_labels: torch.Tensor  # (N',)
    mask: object  # (1, 1, N', N') bool, a BlockMask, or a ``layer_types`` dict of them (``chunk_mask``)
    num_tokens: int  # N, the real tokens


@dataclass
class PreparedPack:
    """A batch packed and its forwards' inputs built before its scoring pass (``pack_ahead.py``)."""

    batch: PackedBatch
    chunks: list[ReadyChunk]
    input_shape: tuple[int, int]  # (B, L) of the rows it packs: checked against the pass's input_ids

    def fits(self, input_ids: torch.Tensor, logits_to_keep: int) -> bool:
        return tuple(input_ids.shape) == self.input_shape and self.batch.num_columns == logits_to_keep


def ready_chunks(batch: PackedBatch, config, mask_kind: str, device: torch.device,
                 max_positions: list[int] | None = None) -> list[ReadyChunk]:
    """Each chunk padded for its mask kind, with its mask. ``max_positions`` (per chunk, known on the host)
    spares sliding-window models reading the positions back from the device."""
    window, per_layer = sliding_window_of(config)
    ready = []
    for i, chunk in enumerate(batch.chunks):
        kind = resolve_mask_kind(mask_kind, device, chunk.num_tokens)
        ids, positions, labels, subtree_end = padded_tree(chunk, pad_multiple(kind, device))
        with torch.profiler.record_function(f"thaw.tree_mask.{kind}"):
            mask = chunk_mask(subtree_end, positions, kind, window, per_layer,
                              max_position=None if max_positions is None else max_positions[i])
        ready.append(ReadyChunk(ids, positions, labels, mask, chunk.num_tokens))
    return ready


def packed_logps(
    model: torch.nn.Module,
    config_model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    logits_to_keep: int,
    *,
    max_rows: int | None,
    max_tokens: int | None,
    mask_kind: str,
    compute_entropy: bool,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    prepared: PreparedPack | None = None,
) -> PackedScores | None:
    """Per-token logprobs (and entropies) of the completion columns, one packed forward per chunk.

    ``model`` is what TRL would call (possibly DDP/DeepSpeed-wrapped, with TRL's fused LM head);
    ``config_model`` the unwrapped module whose config selects the attention; ``autocast`` makes the
    context each forward runs in (TRL's ``accelerator.autocast``). ``prepared``: these rows already packed
    (the trainer's pack-ahead); otherwise they are packed here, which reads them back to the host. None
    when the batch is not in TRL's padding layout (the caller keeps the flat path).
    """
    if prepared is not None:
        batch, chunks = prepared.batch, prepared.chunks
    else:
        with torch.profiler.record_function("thaw.pack_rows"):
            batch = pack_rows(input_ids, attention_mask, logits_to_keep, max_rows=max_rows, max_tokens=max_tokens)
        if batch is None:
            return None
        chunks = ready_chunks(batch, config_model.config, mask_kind, input_ids.device)
    logps, entropies = [], []
    with tree_attention_mode(config_model):
        for chunk in chunks:
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(input_ids=chunk.input_ids[None], position_ids=chunk.position_ids[None],
                            attention_mask=chunk.mask, shift_labels=chunk.shift_labels[None], fused_lm_head=True)
            logps.append(out.log_probs[0, :chunk.num_tokens])  # (N,)
            if compute_entropy:
                entropies.append(out.entropy[0, :chunk.num_tokens])
    return PackedScores(batch.unpack(logps), batch.unpack(entropies) if compute_entropy else None, batch)


def chunk_mask(subtree_end, positions, kind: str, window: int | None, per_layer: bool,
               max_position: int | None = None):
    """The attention mask of one packed tree: a tensor/BlockMask, or a ``layer_types`` dict for models
    whose layers mix full and sliding attention. Without a window, or when no row outgrows it, the
    plain tree mask. ``max_position``: the largest position, when the caller knows it on the host."""
    if window is None:
        return tree_attention_mask(subtree_end, kind)
    if max_position is None:
        max_position = int(positions.max())
    if max_position + 1 <= window:
        return tree_attention_mask(subtree_end, kind)
    if per_layer:
        return {"full_attention": tree_attention_mask(subtree_end, kind),
                "sliding_attention": tree_attention_mask(subtree_end, kind, positions, window)}
    return tree_attention_mask(subtree_end, kind, positions, window)  # every layer windowed


def pad_multiple(kind: str, device: torch.device) -> int:
    """Packed lengths are padded to a multiple of this many tokens.

    Flex needs whole 128-token blocks. On CUDA the dense path pads too: SDPA runs a bool mask through
    cuDNN there, which builds an execution plan per new shape (seen on the H200: 2.7 ms of host time per
    layer call, more than the kernel, with every micro-batch's tree a new length); padded lengths repeat
    and hit its plan cache. On CPU nothing is cached per shape, so nothing is padded.
    """
    return FLEX_PAD if kind == "flex" or device.type == "cuda" else 1


def padded_tree(chunk, multiple: int):
    """The chunk's (ids, positions, labels, subtree_end) padded to a multiple of ``multiple`` tokens.

    Padding tokens are isolated nodes (each sees only itself, nothing sees them, nothing is scored), so
    they change no real token; they keep FlexAttention's shapes to a few sizes.
    """
    n = chunk.num_tokens
    extra = -n % multiple
    if not extra:
        return chunk.input_ids, chunk.position_ids, chunk.shift_labels, chunk.subtree_end
    pad = torch.arange(n, n + extra, device=chunk.input_ids.device)
    return (torch.cat([chunk.input_ids, torch.zeros_like(pad)]), torch.cat([chunk.position_ids, torch.zeros_like(pad)]),
            torch.cat([chunk.shift_labels, torch.full_like(pad, -100)]), torch.cat([chunk.subtree_end, pad + 1]))


def shuffle_groups(seq_dict: dict, group_size: int) -> dict:
    """TRL's ``shuffle_sequence_dict``, permuting whole groups of ``group_size`` consecutive rows.

    Rows that do not split into whole groups (a batch TRL's sampler did not lay out) are shuffled row by
    row, as TRL does.
    """
    batch_size = len(next(v for v in seq_dict.values() if v is not None))
    if group_size <= 1 or batch_size % group_size:
        group_size = 1
    groups = torch.randperm(batch_size // group_size)
    permutation = (groups[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)  # (B,)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[permutation.to(v.device)]
        return [v[i] for i in permutation.tolist()]

    return {key: permute(value) for key, value in seq_dict.items()}


@contextlib.contextmanager
def group_shuffle(group_size: int):
    """Inside the block, TRL's GRPO trainer shuffles generation batches group-wise (see module docstring)."""
    import trl.trainer.grpo_trainer as trl_grpo

    original = trl_grpo.shuffle_sequence_dict
    trl_grpo.shuffle_sequence_dict = lambda seq_dict: shuffle_groups(seq_dict, group_size)
    try:
        yield
    finally:
        trl_grpo.shuffle_sequence_dict = original
