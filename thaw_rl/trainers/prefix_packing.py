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

Everything here is index bookkeeping on the host and small tensors; ``tests/test_prefix_packing.py``
checks the mask against the rows' own ancestry.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def row_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_columns: int):
    """Each row's real tokens and prompt length, or None when a mask is not TRL's layout.

    TRL's layout: the prompt columns are left-padded (``0..0 1..1``) and the last ``num_completion_columns``
    columns right-padded (``1..1 0..0``), so a row's real tokens are contiguous. Anything else (holes in a
    mask) has no packed equivalent of the flat forward, and the caller keeps the flat path.
    """
    ids = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu().bool()
    split = mask.size(1) - num_completion_columns
    prompt_mask, completion_mask = mask[:, :split], mask[:, split:]
    if not torch.equal(prompt_mask, prompt_mask.int().cummax(dim=1).values.bool()):
        return None  # a 1 before a 0 in the prompt columns: not left padding
    if not torch.equal(completion_mask, completion_mask.int().cummin(dim=1).values.bool()):
        return None  # a 0 before a 1 in the completion columns: not right padding
    rows = [ids[i][mask[i]].tolist() for i in range(ids.size(0))]
    prompt_lengths = prompt_mask.sum(dim=1).tolist()
    return rows, prompt_lengths


def pack_rows(
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    num_completion_columns: int,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> PackedBatch | None:
    """Pack the rows into chunks of at most ``max_rows`` rows and ``max_tokens`` packed tokens.

    Returns None when the masks are not TRL's padding layout (see ``row_tokens``). A row longer than
    ``max_tokens`` still gets a chunk of its own: rows are never cut.
    """
    parsed = row_tokens(input_ids, attention_mask, num_completion_columns)
    if parsed is None:
        return None
    rows, prompt_lengths = parsed
    batch_size, num_columns = input_ids.size(0), input_ids.size(1)
    order = sorted(range(batch_size), key=rows.__getitem__)  # lexicographic: the trie's pre-order
    builders: list[_ChunkBuilder] = []
    current: _ChunkBuilder | None = None
    previous: list[int] = []
    for row in order:
        tokens = rows[row]
        shared = _common_prefix(previous, tokens) if current is not None else 0
        new_tokens = len(tokens) - max(shared - 1, 0)
        full = current is not None and (
            (max_rows is not None and current.num_rows >= max_rows)
            or (max_tokens is not None and current.num_tokens + new_tokens > max_tokens))
        if current is None or full:
            current = _ChunkBuilder(num_completion_columns, num_columns)
            builders.append(current)
            shared = 0
        current.add(row, tokens, prompt_lengths[row], shared)
        previous = tokens
    device = input_ids.device
    return PackedBatch([b.build(device) for b in builders], batch_size, num_completion_columns)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slices compared in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _ChunkBuilder:
    """Appends rows (in sorted order) to one pre-order token tree."""

    def __init__(self, num_completion_columns: int, num_columns: int) -> None:
        self.num_completion_columns = num_completion_columns
        self.num_columns = num_columns
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.paths: list[torch.Tensor] = []  # per row: packed index of each of its tokens
        self.row_ids: list[int] = []
        self.row_data: list[tuple[list[int], int]] = []  # (tokens, prompt length)
        self.num_rows = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def add(self, row: int, tokens: list[int], prompt_length: int, shared: int) -> None:
        """Reuse ``shared - 1`` tokens of the previous row's path; append the rest (one re-appended token)."""
        keep = max(shared - 1, 0)
        start = len(self.tokens)
        reused = self.paths[-1][:keep] if keep else torch.empty(0, dtype=torch.int64)
        path = torch.cat([reused, torch.arange(start, start + len(tokens) - keep)])  # (len,)
        self.tokens.extend(tokens[keep:])
        self.positions.extend(range(keep, len(tokens)))
        self.paths.append(path)
        self.row_ids.append(row)
        self.row_data.append((tokens, prompt_length))
        self.num_rows += 1

    def build(self, device: torch.device) -> PackedChunk:
        n = len(self.tokens)
        subtree_end = torch.arange(1, n + 1)  # (N,): a leaf token's subtree is itself
        labels = torch.full((n,), -100, dtype=torch.int64)
        gather = torch.full((self.num_rows, self.num_completion_columns), n, dtype=torch.int64)
        for r, (path, (tokens, prompt_length)) in enumerate(zip(self.paths, self.row_data)):
            if len(path):
                subtree_end.scatter_reduce_(0, path, torch.full_like(path, int(path[-1]) + 1), reduce="amax")
            first = max(prompt_length, 1)  # the first completion token with a predictor
            if first >= len(tokens):
                continue
            predictors = path[first - 1:len(tokens) - 1]  # (C',)
            labels[predictors] = torch.tensor(tokens[first:], dtype=torch.int64)
            gather[r, first - prompt_length:len(tokens) - prompt_length] = predictors
        return PackedChunk(
            input_ids=torch.tensor(self.tokens, dtype=torch.int64, device=device),
            position_ids=torch.tensor(self.positions, dtype=torch.int64, device=device),
            shift_labels=labels.to(device),
            subtree_end=subtree_end.to(device),
            rows=torch.tensor(self.row_ids, dtype=torch.int64, device=device),
            gather=gather.to(device),
            num_flat_tokens=self.num_rows * self.num_columns,
        )
