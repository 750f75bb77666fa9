"""ForkPool's placement and bucket planning as pure functions: exact plans from plain numbers, no processes."""

from __future__ import annotations

import pytest
import torch

from thaw_rl.pool.placement import blocks_per_child, place_children, spread_prompts
from thaw_rl.pool.weight_sync import plan_buckets


def test_a_child_takes_its_growth_plus_the_copied_partial_block():
    assert blocks_per_child(0, 16) == 1
    assert blocks_per_child(1, 16) == 2
    assert blocks_per_child(256, 16) == 17


def test_local_first_fills_home_then_the_roomiest_worker():
    # home (1) has room for 2 children of 3 blocks; worker 0 has 7 blocks, worker 2 has 6
    plan = place_children(room=[7, 6, 6], load=[0, 0, 0], home=1, n=5, per_child=3, placement="local_first")
    assert plan == [1, 1, 0, 0, 2]  # home's first, then by worker index
    # nobody has room: the most room wins, ties to home
    assert place_children([0, 0], [5, 0], home=1, n=2, per_child=3, placement="local_first") == [1, 0]


def test_spread_balances_live_sequences_over_workers_with_room():
    assert place_children([9, 9, 9], [2, 0, 1], home=0, n=4, per_child=3, placement="spread") == [0, 1, 1, 2]
    # worker 1 has no room: it gets nothing while others do
    assert place_children([9, 0, 9], [0, 0, 0], home=1, n=3, per_child=3, placement="spread") == [0, 0, 2]
    with pytest.raises(ValueError, match="placement='random'"):
        place_children([1], [0], 0, 1, 1, "random")


def test_prompts_go_to_the_worker_with_the_fewest_prompt_tokens():
    assert spread_prompts([10, 5, 5, 1], room=[3, 4]) == [1, 0, 0, 1]


def test_buckets_pack_several_parameters_and_a_big_one_alone():
    shapes = {"a": ((3,), torch.float32), "b": ((5,), torch.bfloat16), "big": ((100,), torch.float32),
              "c": ((2, 2), torch.float32)}
    layout = plan_buckets(shapes, bucket_bytes=192)
    assert [[e.name for e in b] for b in layout.buckets] == [["a", "b"], ["big"], ["c"]]
    assert [e.offset for e in layout.buckets[0]] == [0, 64]  # 64-byte aligned: any dtype can view its slice
    assert layout.bucket_nbytes == (128, 448, 64)
    assert layout.names == ["a", "b", "big", "c"]
