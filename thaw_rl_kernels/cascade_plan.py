"""Which rows of a decode batch share a leading run of KV blocks: the metadata of cascade attention.

In a GRPO decode step the G rows of a group point at the same physical blocks for their prompt (forked,
refcount > 1), and the leaves of a segment tree share trunks. Cascade attention (FlashInfer's cascade,
Hydragen) reads such a shared run once per group instead of once per row. This module finds the groups
on the host, from the block tables and lengths alone, once per batch composition: a plan stays valid
while rows only grow (new blocks are never shared) and while rows only leave (``CascadePlan.select``).

A group is a set of rows whose block tables start with the same ``num_shared`` physical block ids. Only
blocks strictly before each row's last position are shared (``num_shared <= (seq_len - 1) // block_size``),
so every row keeps at least its own token in its tail and the tail's log-sum-exp is finite; a prefix that
ends mid-block leaves that block to the tail. Rows are partitioned into groups by a compressed trie over
block ids, choosing at each node the better of "one group here" or "the best of the children", scored by
the block reads saved, ``(num_rows - 1) * num_shared``: 8 prompts of 16 rows that share a 2-block system
prompt become 8 groups over their whole prompts, not one group over the system prompt. One level only: a
tree's trunk shared by a subset of a prompt's rows goes to those rows' tails.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class CascadePlan:
    """Groups of decode rows sharing leading blocks, as flat int32 tensors (CSR over groups).

    Group g owns rows ``group_rows[cu_group_rows[g] : cu_group_rows[g + 1]]`` (row indices of the batch,
    ascending) and shares their first ``group_num_blocks[g]`` blocks; the shared pass reads the block ids
    from the table of the group's first row. Row s attends to positions ``tail_start[s]`` onwards in the tail
    pass (0 for rows in no group).
    """

    group_rows: torch.Tensor  # (R,) int32, rows in groups, group by group
    cu_group_rows: torch.Tensor  # (num_groups + 1,) int32
    group_num_blocks: torch.Tensor  # (num_groups,) int32
    tail_start: torch.Tensor  # (S,) int32, shared tokens of each row
    max_group_rows: int  # host-side upper bound of a group's row count (picks the tiling only)
    max_shared_blocks: int  # host-side max of group_num_blocks

    @property
    def num_groups(self) -> int:
        return self.group_num_blocks.shape[0]

    @property
    def num_rows(self) -> int:
        return self.tail_start.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CascadePlan:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return CascadePlan(**moved)

    def padded(self, num_rows: int, num_groups: int) -> CascadePlan:
        """This plan in tensors of fixed sizes (a CUDA graph's static buffers): ``num_rows`` rows (the extra
        ones in no group, e.g. a graph's padding rows) and ``num_groups`` groups (the extra ones empty, so their
        row tiles exit at once). The kernels' grids depend only on these sizes, so one capture serves every
        plan that fits. ``max_group_rows`` / ``max_shared_blocks`` still pick the tiling: fix them (or pass
        explicit tilings) for a capture."""
        if num_rows < self.num_rows or num_groups < self.num_groups:
            raise ValueError(f"padded({num_rows}, {num_groups}) is smaller than the plan ({self.num_rows} rows, "
                             f"{self.num_groups} groups); pass sizes >= those.")
        num_grouped = self.group_rows.shape[0]
        group_rows = torch.zeros(num_rows, dtype=torch.int32)  # (num_rows,): R used, the rest never read
        group_rows[:num_grouped] = self.group_rows
        cu = torch.full((num_groups + 1,), num_grouped, dtype=torch.int32)  # empty groups past the real ones
        cu[: self.num_groups + 1] = self.cu_group_rows
        blocks = torch.zeros(num_groups, dtype=torch.int32)
        blocks[: self.num_groups] = self.group_num_blocks
        tail = torch.zeros(num_rows, dtype=torch.int32)
        tail[: self.num_rows] = self.tail_start
        return CascadePlan(group_rows, cu, blocks, tail, self.max_group_rows, self.max_shared_blocks)

    def select(self, keep: list[int], block_size: int) -> CascadePlan:
        """The plan of the batch made of rows ``keep`` (in that order) of this one: still exact, since the
        remaining rows of a group still share its blocks; groups left with fewer than 2 rows are dropped.
        Vectorised (a GRPO batch loses a few rows at most steps; ~0.2 ms at 1,024 rows)."""
        if self.num_groups == 0:
            return _plan_from_groups([], len(keep), block_size)
        keep = np.asarray(keep, dtype=np.int64)
        sizes = np.diff(self.cu_group_rows.numpy())
        group_of = np.full(self.num_rows, -1, dtype=np.int64)  # (S_old,)
        group_of[self.group_rows.numpy()] = np.repeat(np.arange(self.num_groups), sizes)
        group = group_of[keep]  # (S_new,)
        counts = np.bincount(group[group >= 0], minlength=self.num_groups)
        group = np.where((group >= 0) & (counts[np.maximum(group, 0)] >= 2), group, -1)
        rows = np.flatnonzero(group >= 0)
        rows = rows[np.argsort(group[rows], kind="stable")]  # group by group, ascending rows within each
        present, row_counts = np.unique(group[rows], return_counts=True)
        num_blocks = self.group_num_blocks.numpy().astype(np.int64)
        tail = np.zeros(len(keep), dtype=np.int32)
        tail[rows] = num_blocks[group[rows]] * block_size
        return CascadePlan(
            group_rows=torch.from_numpy(rows.astype(np.int32)),  # (R,)
            cu_group_rows=torch.from_numpy(np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int32)),
            group_num_blocks=torch.from_numpy(num_blocks[present].astype(np.int32)),
            tail_start=torch.from_numpy(tail),
            max_group_rows=int(row_counts.max(initial=0)),
            max_shared_blocks=int(num_blocks[present].max(initial=0)),
        )


def plan_cascade(
    block_tables: torch.Tensor | np.ndarray | list[list[int]],
    seq_lens: torch.Tensor | np.ndarray | list[int],
    block_size: int,
    min_group_rows: int = 2,
) -> CascadePlan:
    """Group the rows of a decode batch by shared leading blocks (host work; see the module docstring).

    Args:
        block_tables: (S, W) block ids per row (entries past a row's blocks are ignored), or lists.
        seq_lens: (S,) context length of each row, its new token included.
        block_size: tokens per block.
        min_group_rows: a group needs at least this many rows (>= 2; a one-row group saves nothing).
    """
    if min_group_rows < 2:
        raise ValueError(f"min_group_rows={min_group_rows} must be >= 2: a group of one row reads nothing less.")
    lens = np.asarray(seq_lens.cpu() if isinstance(seq_lens, torch.Tensor) else seq_lens, dtype=np.int64)
    tables = _as_table(block_tables, lens, block_size)
    if tables.shape[0] != lens.shape[0]:
        raise ValueError(f"block_tables has {tables.shape[0]} rows but seq_lens {lens.shape[0]}; pass one per row.")
    if (lens < 1).any():
        raise ValueError("every decode row needs seq_len >= 1 (its own new token); drop idle rows first.")
    caps = (lens - 1) // block_size  # blocks strictly before each row's last position
    groups: list[tuple[list[int], int]] = []
    rows = np.flatnonzero(caps > 0)
    _best(tables, caps, rows, 0, min_group_rows, groups)
    return _plan_from_groups(sorted(groups), len(lens), block_size)


def _as_table(block_tables, lens: np.ndarray, block_size: int) -> np.ndarray:
    if isinstance(block_tables, torch.Tensor):
        return block_tables.cpu().numpy().astype(np.int64, copy=False)
    if isinstance(block_tables, np.ndarray):
        return block_tables.astype(np.int64, copy=False)
    width = max((len(t) for t in block_tables), default=0)
    table = np.full((len(block_tables), width), -1, dtype=np.int64)
    for i, t in enumerate(block_tables):
        table[i, : len(t)] = t
    return table


def _best(tables: np.ndarray, caps: np.ndarray, rows: np.ndarray, depth: int, min_rows: int,
          out: list[tuple[list[int], int]]) -> int:
    """Best saving over ``rows`` (which share their first ``depth`` blocks); appends the chosen groups to out."""
    if len(rows) < min_rows:
        return 0
    # Deepen while every row agrees and no row reaches its cap: the compressed trie's edge.
    limit = int(caps[rows].min())
    cols = tables[rows, depth:limit]  # (n, limit - depth)
    agree = (cols == cols[:1]).all(axis=0)
    common = depth + (int(np.argmin(agree)) if not agree.all() else limit - depth)
    here = (len(rows) - 1) * common
    # Children: rows that can go deeper, split by their block at column `common`.
    deeper = rows[caps[rows] > common]
    children: list[tuple[list[int], int]] = []
    saved = 0
    if len(deeper) >= min_rows:
        ids = tables[deeper, common]
        for block in np.unique(ids):
            saved += _best(tables, caps, deeper[ids == block], common + 1, min_rows, children)
    if here >= saved and common > 0:
        out.append((rows.tolist(), common))
        return here
    out.extend(children)
    return saved


def _plan_from_groups(groups: list[tuple[list[int], int]], num_rows: int, block_size: int) -> CascadePlan:
    tail = torch.zeros(num_rows, dtype=torch.int32)  # (S,)
    flat: list[int] = []
    cu = [0]
    for rows, n in groups:
        flat.extend(rows)
        cu.append(len(flat))
        tail[rows] = n * block_size
    return CascadePlan(
        group_rows=torch.tensor(flat, dtype=torch.int32),  # (R,)
        cu_group_rows=torch.tensor(cu, dtype=torch.int32),  # (G + 1,)
        group_num_blocks=torch.tensor([n for _, n in groups], dtype=torch.int32),  # (G,)
        tail_start=tail,
        max_group_rows=max((len(r) for r, _ in groups), default=0),
        max_shared_blocks=max((n for _, n in groups), default=0),
    )
