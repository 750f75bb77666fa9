"""Shared-prefix packing: the rows of a training batch as one token tree, each shared prefix once.

TRL scores a batch of rows ``(B, L)`` (left-padded prompt + right-padded completion) with a forward over
every row, so a prompt shared by a GRPO group of G rows is computed G times, and a segment tree's shared
nodes once per leaf. ``pack_rows`` lays the rows out as a trie instead: rows are sorted, each row reuses
the longest prefix it shares with the row before it, and only its new tokens are appended. Sorted order
makes the layout a depth-first pre-order of the trie, so every node's subtree is one contiguous range
``[k, subtree_end[k])``, and "key k is an ancestor of query q (or q itself)" is simply
``k <= q < subtree_end[k]``: the whole tree mask is one ``(N,)`` vector (``tree_attention.py`` turns it
into a dense SDPA mask or a FlexAttention block mask). Positions are each token's depth in its own row,
so RoPE sees exactly the positions a row would have alone.

Scoring with TRL's fused LM head. The fused head scores position k against one label,
``shift_labels[k]`` (the next token). Where rows diverge (G samples after one prompt, siblings after a
fork) the last shared token would need G labels. So a row that diverges from the previous one at depth
``d`` re-appends its own copy of the token at depth ``d - 1``: one extra token per row, and every packed
token then has exactly one next token. A row's log-probability of completion token j is read at its
predictor, the packed index of the token before it on its own path (``gather``).

The result equals the flat computation: a token's hidden state depends only on the tokens on its path
and their positions, which are the same as in its row. Two rows whose completions coincide token for
token share those tokens too (the trie merges by content, which is exact for the same reason).

Everything here is index bookkeeping on the host, vectorized over rows and tokens with numpy (no loop
over tokens; one short loop over rows decides the chunks). ``pack_host_rows`` takes rows already on the
host and never touches a device, so a pipeline can pack micro-batch k+1 while the GPU runs micro-batch k
and move the chunks with ``PackedBatch.to(device, non_blocking=True)`` (pinned copies). ``pack_rows``
takes TRL's ``(B, L)`` tensors on any device (reading them waits for the device).
``tests/test_prefix_packing.py`` checks the result against the per-row reference builder bit for bit,
``tests/test_shared_prefix_training.py`` the mask against the rows' own ancestry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

import numpy as np
import torch


@dataclass
class PackedChunk:
    """One packed forward: a token tree laid out in pre-order, and how to read each row back out of it."""

    input_ids: torch.Tensor  # (N,) int64
    position_ids: torch.Tensor  # (N,) int64: depth of each token in its rows
    shift_labels: torch.Tensor  # (N,) int64: the next token to score at each position, -100 where none
    subtree_end: torch.Tensor  # (N,) int64: token k's subtree is [k, subtree_end[k])
    rows: torch.Tensor  # (R,) int64: the batch rows this chunk holds
    gather: torch.Tensor  # (R, T) int64: packed predictor of each completion column; N = no token (padding)
    num_flat_tokens: int  # what a flat forward over these rows runs: R x padded row length

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-position values ``(N,)`` -> per-row completion values ``(R, T)`` (0 at padding columns)."""
        padded = torch.cat([packed, packed.new_zeros(1)])  # (N + 1,): index N reads the zero
        return padded[self.gather.to(packed.device)]  # (R, T)

    def pin_memory(self) -> "PackedChunk":
        """A copy in pinned host memory (needs CUDA), so ``to(device, non_blocking=True)`` is asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedChunk":
        """The chunk on ``device``. With ``non_blocking`` a host chunk is pinned first (unless it is already)
        and copied without waiting for the device: the host never synchronizes with it."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)
        return self._map(move)

    def _map(self, fn) -> "PackedChunk":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class PackedBatch:
    """All chunks of one batch and the counts the ``thaw/train_tokens*`` metrics report."""

    chunks: list[PackedChunk]
    num_rows: int
    num_columns: int  # T, completion columns

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_flat_tokens(self) -> int:
        return sum(c.num_flat_tokens for c in self.chunks)

    def unpack(self, packed_per_chunk: list[torch.Tensor]) -> torch.Tensor:
        """One ``(N_c,)`` tensor per chunk -> ``(B, T)`` in the batch's row order (autograd flows through)."""
        if len(packed_per_chunk) != len(self.chunks):
            raise RuntimeError(f"{len(packed_per_chunk)} packed outputs for {len(self.chunks)} chunks")
        per_chunk = [c.unpack(p) for c, p in zip(self.chunks, packed_per_chunk)]  # (R_c, T) each
        rows = torch.cat([c.rows for c in self.chunks]).to(per_chunk[0].device)  # (B,)
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(rows.numel(), device=rows.device)
        return torch.cat(per_chunk, dim=0)[inverse]  # (B, T)

    def pin_memory(self) -> "PackedBatch":
        return replace(self, chunks=[c.pin_memory() for c in self.chunks])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Every chunk on ``device`` (see ``PackedChunk.to``)."""
        return replace(self, chunks=[c.to(device, non_blocking) for c in self.chunks])



def row_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_columns: int):
    """Each row's real tokens, left-aligned, or None when a mask is not TRL's layout.

    Returns ``(tokens (B, L), lengths (B,), prompt_lengths (B,))`` as host int64 arrays: row b's real
    tokens are ``tokens[b, :lengths[b]]`` (what lies beyond is not a token). TRL's layout: the prompt
    columns are left-padded (``0..0 1..1``) and the last ``num_completion_columns`` columns right-padded
    (``1..1 0..0``), so a row's real tokens are contiguous. Anything else (holes in a mask) has no packed
    equivalent of the flat forward, and the caller keeps the flat path. Reads the tensors to the host.
    """
    num_columns = input_ids.size(1)
    if not 0 <= num_completion_columns <= num_columns:
        raise ValueError(f"num_completion_columns={num_completion_columns} for rows of {num_columns} columns: "
                         "pass the number of completion columns (TRL's logits_to_keep)")
    ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)  # (B, L)
    mask = attention_mask.detach().cpu().numpy().astype(bool, copy=False)  # (B, L)
    split = num_columns - num_completion_columns
    prompt_mask, completion_mask = mask[:, :split], mask[:, split:]
    if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any():
        return None  # a 1 before a 0 in the prompt columns: not left padding
    if (completion_mask[:, 1:] > completion_mask[:, :-1]).any():
        return None  # a 0 before a 1 in the completion columns: not right padding
    prompt_lengths = prompt_mask.sum(axis=1, dtype=np.int64)  # (B,)
    lengths = prompt_lengths + completion_mask.sum(axis=1, dtype=np.int64)  # (B,)
    columns = (split - prompt_lengths)[:, None] + np.arange(num_columns)[None, :]  # (B, L): row b starts there
    tokens = np.take_along_axis(ids, np.minimum(columns, num_columns - 1), axis=1)  # (B, L)
    return tokens, lengths, prompt_lengths


def pack_rows(
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    num_completion_columns: int,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> PackedBatch | None:
    """Pack the rows into chunks of at most ``max_rows`` rows and ``max_tokens`` packed tokens, on the
    rows' device.

    Returns None when the masks are not TRL's padding layout (see ``row_tokens``). A row longer than
    ``max_tokens`` still gets a chunk of its own: rows are never cut. Rows on a device are read to the
    host first (that waits for the device); a pipeline that must not wait calls ``pack_host_rows`` on rows
    it already holds on the host.
    """
    parsed = row_tokens(input_ids, attention_mask, num_completion_columns)
    if parsed is None:
        return None
    tokens, lengths, prompt_lengths = parsed
    batch = pack_host_rows(tokens, prompt_lengths, input_ids.size(1), num_completion_columns, lengths=lengths,
                           max_rows=max_rows, max_tokens=max_tokens)
    return batch.to(input_ids.device, non_blocking=True)


def pack_host_rows(
    token_rows,
    prompt_lengths,
    num_columns: int,
    num_completion_columns: int,
    *,
    lengths=None,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> PackedBatch:
    """``pack_rows`` on rows already on the host: CPU tensors in the returned chunks, no device touched.

    ``token_rows``: one sequence of real tokens per row (lists, 1-D arrays or CPU tensors), or a 2-D host
    array / CPU tensor ``(B, W)`` of left-aligned rows with their ``lengths``. ``prompt_lengths``: each
    row's number of prompt tokens; the rest of a row are its completion tokens, at most
    ``num_completion_columns`` of them. ``num_columns`` is the flat row length ``L`` (for
    ``num_flat_tokens``).
    """
    tokens, lengths = _host_rows(token_rows, lengths)
    prompt_lengths = _host_array(prompt_lengths, "prompt_lengths")
    if prompt_lengths.shape != lengths.shape:
        raise ValueError(f"{prompt_lengths.size} prompt lengths for {lengths.size} rows: pass one per row")
    completion_lengths = lengths - prompt_lengths
    if (prompt_lengths < 0).any() or (completion_lengths < 0).any() or \
            (completion_lengths > num_completion_columns).any():
        raise ValueError(f"prompt lengths {prompt_lengths.tolist()} for rows of lengths {lengths.tolist()} and "
                         f"{num_completion_columns} completion columns: each row's prompt must fit in it and its "
                         "completion in the completion columns")
    order = _lexicographic_order(tokens, lengths)  # (B,): the trie's pre-order
    tokens, lengths, prompt_lengths = tokens[order], lengths[order], prompt_lengths[order]
    shared = _shared_with_previous(tokens, lengths)  # (B,)
    chunks = []
    for first, end in _chunk_bounds(lengths, shared, max_rows, max_tokens):
        keep = np.maximum(shared[first:end] - 1, 0)  # (R,): tokens reused from the previous row's path
        keep[0] = 0  # a chunk's first row starts a new tree
        chunks.append(_build_chunk(tokens[first:end], lengths[first:end], prompt_lengths[first:end], keep,
                                   order[first:end], num_columns, num_completion_columns))
    return PackedBatch(chunks, int(lengths.size), num_completion_columns)


def _host_array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} is on {values.device}: pack_host_rows takes host rows (reading a device "
                             "tensor would wait for the device); use pack_rows, or pass the rollout's host copy")
        values = values.numpy()
    return np.asarray(values, dtype=np.int64)


def _host_rows(token_rows, lengths) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, W) left-aligned, lengths (B,)) as int64 arrays, W >= 1."""
    if isinstance(token_rows, (torch.Tensor, np.ndarray)) and token_rows.ndim == 2:
        tokens = _host_array(token_rows, "token_rows")
        if lengths is None:
            raise ValueError("a 2-D token_rows needs lengths (each row's number of real tokens)")
        lengths = _host_array(lengths, "lengths")
        if lengths.shape != (tokens.shape[0],) or (lengths < 0).any() or (lengths > tokens.shape[1]).any():
            raise ValueError(f"lengths {lengths.tolist()} for token_rows of shape {tokens.shape}: pass one length "
                             "per row, each at most the row width")
    else:
        if lengths is not None:
            raise ValueError("lengths is for a 2-D token_rows; a sequence of rows carries its own lengths")
        rows = list(token_rows)
        if all(isinstance(row, list) for row in rows):  # Python ints: one pass over all of them
            lengths = np.array([len(row) for row in rows], dtype=np.int64)
            flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        else:
            rows = [_host_array(row, "token_rows").reshape(-1) for row in rows]
            lengths = np.array([row.size for row in rows], dtype=np.int64)
            flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        tokens = np.zeros((len(rows), int(lengths.max(initial=0))), dtype=np.int64)
        tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]] = flat
    if tokens.shape[1] == 0:
        tokens = np.zeros((tokens.shape[0], 1), dtype=np.int64)
    return tokens, lengths


def _lexicographic_order(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The stable lexicographic order of the rows (a prefix first), as Python sorts lists of ints.

    Each row becomes bytes that compare like its tokens: int64 with the sign bit flipped, big-endian.
    """
    keys = (tokens.view(np.uint64) ^ np.uint64(1 << 63)).astype(">u8")  # (B, W)
    row_keys = [keys[b, :n].tobytes() for b, n in enumerate(lengths.tolist())]
    return np.array(sorted(range(len(row_keys)), key=row_keys.__getitem__), dtype=np.int64)


def _shared_with_previous(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B,): the length of the common prefix of each row with the row before it (0 for the first)."""
    shared = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size < 2:
        return shared
    common = np.minimum(lengths[1:], lengths[:-1])  # (B - 1,)
    differ = (tokens[1:] != tokens[:-1]) | (np.arange(tokens.shape[1])[None, :] >= common[:, None])  # (B-1, W)
    differ = np.concatenate([differ, np.ones((lengths.size - 1, 1), dtype=bool)], axis=1)  # a stop at W
    shared[1:] = differ.argmax(axis=1)  # the first mismatch
    return shared


def _chunk_bounds(lengths: np.ndarray, shared: np.ndarray, max_rows: int | None, max_tokens: int | None):
    """[first, end) row ranges of the chunks, filled greedily in order; a row that does not fit (rows or
    tokens, counting what it would add after the previous row) opens the next chunk."""
    added = (lengths - np.maximum(shared - 1, 0)).tolist()  # tokens each row adds after its predecessor
    bounds, first, num_tokens = [], 0, 0
    for row, (length, new_tokens) in enumerate(zip(lengths.tolist(), added)):
        if row > first and ((max_rows is not None and row - first >= max_rows)
                            or (max_tokens is not None and num_tokens + new_tokens > max_tokens)):
            bounds.append((first, row))
            first, num_tokens = row, 0
        num_tokens += length if row == first else new_tokens
    if lengths.size:
        bounds.append((first, int(lengths.size)))
    return bounds


def _build_chunk(tokens, lengths, prompt_lengths, keep, rows, num_columns: int, num_completion_columns: int):
    """One pre-order token tree from sorted rows ``(R, W)``; row r reuses the previous row's first
    ``keep[r]`` tokens and appends the rest."""
    num_rows = lengths.size
    width = max(int(lengths.max()), 1)
    tokens = tokens[:, :width]  # (R, W)
    depth = np.arange(width)[None, :]  # (1, W)
    real = depth < lengths[:, None]  # (R, W)
    appended = real & (depth >= keep[:, None])  # (R, W): the tokens row r appends
    num_appended = lengths - keep  # (R,)
    start = np.cumsum(num_appended) - num_appended  # (R,): packed index of row r's first appended token
    n = int(num_appended.sum())
    # path[r, j]: packed index of row r's token at depth j = start[s] - keep[s] + j for the last row s <= r
    # that appended depth j (keep[s] <= j). start - keep never decreases (start[s + 1] - start[s] = len[s] -
    # keep[s] and keep[s + 1] <= len[s]), so the last such row's offset is the running maximum down the rows
    offset = np.where(depth >= keep[:, None], (start - keep)[:, None], -1)  # (R, W): -1 where reused
    path = np.maximum.accumulate(offset, axis=0) + depth  # (R, W), meaningful where real
    # token k's subtree ends after the last row on it: row r is the last at depth j when the next row
    # re-appends depth j (or there is no next row); rows on k are consecutive, so each k is written once
    next_keep = np.append(keep[1:], 0)  # (R,)
    last_on = real & (depth >= next_keep[:, None])  # (R, W)
    subtree_end = np.empty(n, dtype=np.int64)  # (N,)
    subtree_end[path[last_on]] = np.broadcast_to((start + num_appended)[:, None], path.shape)[last_on]
    # completion column c of row r is depth p_r + c, scored at its predictor (depth p_r + c - 1)
    column_depth = prompt_lengths[:, None] + np.arange(num_completion_columns)[None, :]  # (R, T)
    scored = (column_depth >= 1) & (column_depth < lengths[:, None])  # (R, T)
    predictor = np.take_along_axis(path, np.clip(column_depth - 1, 0, width - 1), axis=1)  # (R, T)
    gather = np.where(scored, predictor, n)  # (R, T)
    shift_labels = np.full(n, -100, dtype=np.int64)  # (N,): rows sharing a predictor share its next token
    shift_labels[predictor[scored]] = np.take_along_axis(tokens, np.clip(column_depth, 0, width - 1), axis=1)[scored]
    return PackedChunk(
        input_ids=torch.from_numpy(tokens[appended]),
        position_ids=torch.from_numpy(np.broadcast_to(depth, tokens.shape)[appended]),
        shift_labels=torch.from_numpy(shift_labels),
        subtree_end=torch.from_numpy(subtree_end),
        rows=torch.from_numpy(np.ascontiguousarray(rows)),
        gather=torch.from_numpy(gather),
        num_flat_tokens=num_rows * num_columns,
    )
