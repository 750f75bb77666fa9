"""The vectorized host packing equals the per-row reference builder bit for bit.

The story: ``reference_pack_rows`` below is the original per-row, per-token builder (a sorted trie built
one row at a time with Python lists), kept here as the reference. On random batches of every shape the
trainers produce (GRPO groups, segment-tree rows sharing partial completions, unequal lengths and early
EOS, empty completions, duplicate rows, tiny vocabularies where unrelated rows share prefixes by chance),
under row and token budgets (including rows longer than the budget), ``pack_rows`` and ``pack_host_rows``
return the same chunks: same input_ids, position_ids, shift_labels, subtree_end, rows, gather and flat
counts; masks that are not TRL's layout give None from both. ``pack_host_rows`` refuses device tensors,
and a chunk moves with ``to``. The tree's block mask lists the same blocks as ``BlockMask.from_kv_blocks``
derives from its kv lists (all eight tensors equal), with and without a sliding window.
"""

from __future__ import annotations

import random

import pytest
import torch

from thaw_rl.testing import trl_rows
from thaw_rl.trainers.prefix_packing import PackedBatch, pack_host_rows, pack_rows
from thaw_rl.trainers.shared_prefix import padded_tree
from thaw_rl.trainers.tree_attention import tree_block_mask


# -- the reference: the original per-row builder -----------------------------------------------------------
def reference_pack_rows(input_ids, attention_mask, num_completion_columns, *, max_rows=None, max_tokens=None):
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    split = mask.size(1) - num_completion_columns
    prompt_mask, completion_mask = mask[:, :split], mask[:, split:]
    if not torch.equal(prompt_mask, prompt_mask.int().cummax(dim=1).values.bool()):
        return None
    if not torch.equal(completion_mask, completion_mask.int().cummin(dim=1).values.bool()):
        return None
    rows = [ids[i][mask[i]].tolist() for i in range(ids.size(0))]
    prompt_lengths = prompt_mask.sum(dim=1).tolist()
    order = sorted(range(ids.size(0)), key=rows.__getitem__)
    builders, current, previous = [], None, []
    for row in order:
        tokens = rows[row]
        shared = _reference_common_prefix(previous, tokens) if current is not None else 0
        new_tokens = len(tokens) - max(shared - 1, 0)
        full = current is not None and (
            (max_rows is not None and current["num_rows"] >= max_rows)
            or (max_tokens is not None and len(current["tokens"]) + new_tokens > max_tokens))
        if current is None or full:
            current = {"tokens": [], "positions": [], "paths": [], "rows": [], "data": [], "num_rows": 0}
            builders.append(current)
            shared = 0
        keep = max(shared - 1, 0)
        start = len(current["tokens"])
        reused = current["paths"][-1][:keep] if keep else torch.empty(0, dtype=torch.int64)
        current["paths"].append(torch.cat([reused, torch.arange(start, start + len(tokens) - keep)]))
        current["tokens"].extend(tokens[keep:])
        current["positions"].extend(range(keep, len(tokens)))
        current["rows"].append(row)
        current["data"].append((tokens, prompt_lengths[row]))
        current["num_rows"] += 1
        previous = tokens
    return [_reference_build(b, num_completion_columns, ids.size(1)) for b in builders]


def _reference_common_prefix(a, b):
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _reference_build(b, num_completion_columns, num_columns):
    n = len(b["tokens"])
    subtree_end = torch.arange(1, n + 1)
    labels = torch.full((n,), -100, dtype=torch.int64)
    gather = torch.full((b["num_rows"], num_completion_columns), n, dtype=torch.int64)
    for r, (path, (tokens, prompt_length)) in enumerate(zip(b["paths"], b["data"])):
        if len(path):
            subtree_end.scatter_reduce_(0, path, torch.full_like(path, int(path[-1]) + 1), reduce="amax")
        first = max(prompt_length, 1)
        if first >= len(tokens):
            continue
        predictors = path[first - 1:len(tokens) - 1]
        labels[predictors] = torch.tensor(tokens[first:], dtype=torch.int64)
        gather[r, first - prompt_length:len(tokens) - prompt_length] = predictors
    return {"input_ids": torch.tensor(b["tokens"], dtype=torch.int64),
            "position_ids": torch.tensor(b["positions"], dtype=torch.int64),
            "shift_labels": labels, "subtree_end": subtree_end,
            "rows": torch.tensor(b["rows"], dtype=torch.int64), "gather": gather,
            "num_flat_tokens": b["num_rows"] * num_columns}


def assert_same_chunks(batch: PackedBatch, reference: list[dict]):
    assert len(batch.chunks) == len(reference)
    for chunk, expected in zip(batch.chunks, reference):
        for name, value in expected.items():
            ours = getattr(chunk, name)
            if isinstance(value, torch.Tensor):
                assert ours.dtype == torch.int64 and ours.device.type == "cpu", name
                assert torch.equal(ours, value), name
            else:
                assert ours == value, name


# -- random batches -------------------------------------------------------------------------------------------
def random_batch(seed: int):
    """Prompts and completions as the trainers make them, from a small vocabulary."""
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 50])
    width = rng.randint(1, 9)

    offset = rng.choice([0, 0, -1, -(1 << 40)])  # ids sort as integers, negative and wide ones too

    def tokens(n):
        return [offset + rng.randrange(vocab) for _ in range(n)]

    prompts, completions = [], []
    for _ in range(rng.randint(1, 4)):
        prompt = tokens(rng.randint(0, 6))
        kind = rng.choice(["grpo", "tree", "mixed"])
        trunk = tokens(rng.randint(0, width))
        for _ in range(rng.randint(1, 6)):
            if kind == "tree" or (kind == "mixed" and rng.random() < 0.5):  # a shared part of a completion
                head = trunk[:rng.randint(0, len(trunk))]
                completion = head + tokens(rng.randint(0, width - len(head)))
            else:
                completion = tokens(rng.randint(0, width))  # early EOS: shorter than the width
            prompts.append(prompt)
            completions.append(completion)
            if rng.random() < 0.2:  # a duplicate row
                prompts.append(prompt)
                completions.append(list(completion))
    if max(len(p) for p in prompts) == 0:
        prompts[0] = tokens(1)
    permutation = list(range(len(prompts)))
    rng.shuffle(permutation)
    prompts, completions = [prompts[i] for i in permutation], [completions[i] for i in permutation]
    ids, mask = trl_rows(prompts, completions, width, pad=offset + rng.randrange(vocab))
    budgets = rng.choice([{}, {"max_rows": rng.randint(1, 5)}, {"max_tokens": rng.randint(1, 30)},
                          {"max_rows": rng.randint(1, 5), "max_tokens": rng.randint(5, 40)}])
    return ids, mask, width, prompts, completions, budgets


@pytest.mark.parametrize("seed", range(300))
def test_pack_rows_equals_the_reference_builder(seed):
    ids, mask, width, _, _, budgets = random_batch(seed)
    expected = reference_pack_rows(ids, mask, width, **budgets)
    batch = pack_rows(ids, mask, width, **budgets)
    assert_same_chunks(batch, expected)
    assert batch.num_rows == ids.size(0) and batch.num_columns == width


@pytest.mark.parametrize("seed", range(40))
def test_pack_host_rows_from_lists_equals_pack_rows(seed):
    ids, mask, width, prompts, completions, budgets = random_batch(seed)
    rows = [p + c for p, c in zip(prompts, completions)]
    expected = reference_pack_rows(ids, mask, width, **budgets)
    assert_same_chunks(pack_host_rows(rows, [len(p) for p in prompts], ids.size(1), width, **budgets), expected)
    as_tensors = [torch.tensor(row, dtype=torch.int64) for row in rows]  # 1-D host tensors work the same
    assert_same_chunks(pack_host_rows(as_tensors, torch.tensor([len(p) for p in prompts]), ids.size(1), width,
                                      **budgets), expected)


def test_rows_longer_than_the_token_budget_get_a_chunk_each():
    ids, mask = trl_rows([[1, 2, 3, 4]] * 3, [[5, 6], [5, 7], [8]], 2)
    batch = pack_rows(ids, mask, 2, max_tokens=3)
    assert [c.num_tokens for c in batch.chunks] == [6, 6, 5]  # sorted: ..5 6 < ..5 7 < ..8
    assert_same_chunks(batch, reference_pack_rows(ids, mask, 2, max_tokens=3))
    # 1 2 3 4 5 6, then the second row re-appends 5 and adds 7 (8 tokens); the third would add 4 8: over
    batch = pack_rows(ids, mask, 2, max_tokens=8)
    assert [c.input_ids.tolist() for c in batch.chunks] == [[1, 2, 3, 4, 5, 6, 5, 7], [1, 2, 3, 4, 8]]
    assert batch.chunks[0].subtree_end.tolist() == [8, 8, 8, 8, 6, 6, 8, 8]
    assert batch.chunks[0].rows.tolist() == [0, 1] and batch.chunks[1].rows.tolist() == [2]
    assert_same_chunks(batch, reference_pack_rows(ids, mask, 2, max_tokens=8))


@pytest.mark.parametrize("seed", range(20))
def test_masks_with_holes_are_not_packed(seed):
    ids, mask, width, _, _, _ = random_batch(seed)
    holed = mask.clone()
    holed.view(-1)[random.Random(seed).randrange(holed.numel())] ^= 1
    expected = reference_pack_rows(ids, holed, width)
    if expected is None:
        assert pack_rows(ids, holed, width) is None
    else:  # the flip kept the layout (it moved a padding edge): still the same chunks
        assert_same_chunks(pack_rows(ids, holed, width), expected)


def test_pack_host_rows_takes_a_left_aligned_array_with_lengths():
    rows = torch.tensor([[7, 8, 9, 0], [7, 8, 1, 2], [7, 0, 0, 0]])  # (B, W), left-aligned
    batch = pack_host_rows(rows, [2, 2, 1], 5, 3, lengths=[3, 4, 1])
    expected = pack_host_rows([[7, 8, 9], [7, 8, 1, 2], [7]], [2, 2, 1], 5, 3)
    for ours, theirs in zip(batch.chunks, expected.chunks):
        assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.gather, theirs.gather)
    (chunk,) = batch.chunks
    # sorted: [7] < [7 8 1 2] < [7 8 9]; each row after the first re-appends its last shared token
    assert chunk.rows.tolist() == [2, 1, 0]
    assert chunk.input_ids.tolist() == [7, 7, 8, 1, 2, 8, 9]
    assert chunk.position_ids.tolist() == [0, 0, 1, 2, 3, 1, 2]
    assert chunk.shift_labels.tolist() == [-100, -100, 1, 2, -100, 9, -100]  # completion tokens only
    assert chunk.gather.tolist() == [[7, 7, 7], [2, 3, 7], [5, 7, 7]]


def test_pack_host_rows_refuses_device_tensors_and_bad_lengths():
    with pytest.raises(ValueError, match="pack_host_rows takes host rows"):
        pack_host_rows(torch.zeros(2, 3, dtype=torch.int64, device="meta"), [1, 1], 3, 2, lengths=[2, 2])
    with pytest.raises(ValueError, match="needs lengths"):
        pack_host_rows(torch.zeros(2, 3, dtype=torch.int64), [1, 1], 3, 2)
    with pytest.raises(ValueError, match="completion in the completion columns"):
        pack_host_rows([[1, 2, 3, 4]], [1], 4, 2)


def test_empty_batches_and_empty_rows_pack():
    assert pack_host_rows([], [], 4, 2).chunks == []
    (chunk,) = pack_host_rows([[], [5]], [0, 0], 2, 2).chunks
    assert chunk.input_ids.tolist() == [5] and chunk.rows.tolist() == [0, 1]
    assert chunk.gather.tolist() == [[1, 1], [1, 1]]  # nothing to score: row 1's first token has no predictor


def test_a_chunk_moves_to_a_device_whole():
    ids, mask, width, _, _, _ = random_batch(0)
    batch = pack_rows(ids, mask, width)
    moved = batch.to("cpu", non_blocking=True)
    for ours, theirs in zip(moved.chunks, batch.chunks):
        assert torch.equal(ours.gather, theirs.gather) and ours.num_flat_tokens == theirs.num_flat_tokens
    assert torch.equal(moved.unpack([c.input_ids.float() for c in moved.chunks]),
                       batch.unpack([c.input_ids.float() for c in batch.chunks]))


# -- the block mask -----------------------------------------------------------------------------------------
def reference_block_mask(ends, block_size=128, windowed=False):
    """kv lists from the per-block rule, q lists by flex's own transpose (``from_kv_blocks``)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = ends.numel() // block_size
    reach, floor = ends.view(blocks, block_size).max(dim=1).values, ends.view(blocks, block_size).min(dim=1).values
    q = torch.arange(blocks)[:, None]
    visible = (q.T <= q) & (reach[None, :] > q * block_size)
    full = (q.T < q) & (floor[None, :] >= (q + 1) * block_size) & (not windowed)
    partial = visible & ~full

    def listed(flags):
        return (flags.sum(dim=1).to(torch.int32)[None, None],
                torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)[None, None])
    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block_size,
                                    seq_lengths=(ends.numel(), ends.numel()))


BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("seed", range(6))
def test_tree_block_mask_lists_what_from_kv_blocks_derives(seed):
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(rng.randint(1, 3)):  # groups with long prompts (full blocks) and segment-tree completions
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 400))]
        trunk = [rng.randrange(50) for _ in range(rng.randint(0, 150))]
        for _ in range(rng.randint(1, 5)):
            head = trunk[:rng.randint(0, len(trunk))]
            prompts.append(prompt)
            completions.append(head + [rng.randrange(50) for _ in range(rng.randint(0, 300 - len(head)))])
    ids, mask = trl_rows(prompts, completions, 300)
    (chunk,) = pack_rows(ids, mask, 300).chunks
    _, positions, _, ends = padded_tree(chunk, 128)
    for window in (None, rng.randint(20, 200)):
        ours = tree_block_mask(ends, positions=positions, window=window)
        theirs = reference_block_mask(ends, windowed=window is not None)
        for name in BLOCK_FIELDS:
            a, b = getattr(ours, name), getattr(theirs, name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE


def test_tree_block_mask_lists_are_each_their_own_contiguous_tensor():
    ends = torch.arange(1, 257)  # (256,): two blocks of isolated tokens
    here = tree_block_mask(ends)
    assert here.kv_num_blocks.tolist() == [[[1, 1]]] and here.kv_indices.tolist() == [[[[0, 1], [1, 0]]]]
    assert all(getattr(here, name).storage_offset() == 0 and getattr(here, name).is_contiguous()
               for name in BLOCK_FIELDS)  # each its own tensor, as from_kv_blocks makes them
