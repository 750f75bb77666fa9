"""When decode steps use cascade (shared-prefix) attention, and the plan they use, kept across steps.

``thaw_rl_kernels.cascade_plan`` finds the rows of a decode batch that share leading KV blocks (a GRPO
group's prompt). Building that plan is host work (~1 ms at 128 rows, ~10 ms at 1,024), so it is built
when rows join the batch and carried otherwise: a plan stays exact while rows only grow (new blocks are
never shared) and while rows only leave (``CascadePlan.select``).

Modes (``ThawEngine(cascade_attention=...)``):
- ``"off"``: never.
- ``"on"``: every pure-decode step whose batch has a group: eager ones, and those the async decode loop replays
  from a CUDA graph (the synchronous loop's graph steps stay plain); on CPU through the torch reference, which is
  exact but not faster: it is there to test the wiring.
- ``"auto"`` (default): on CUDA, decode steps replayed from a CUDA graph whose rows share enough
  (``worth_cascade``); eager steps stay plain (there the two passes' Triton launches cost more than the reads
  they save: ``cascade_decode_h200_qwen2.5-1.5b.json``). Off on CPU.

The rule is the H200's (``benchmarks/results/grpo_decode_attention_h200_s10.json``, Qwen2.5-1.5B heads, groups
of 16, prompts of 256-2,048 tokens, 64-1,024 rows, a 28-layer pass replayed in a CUDA graph): what cascade saves
grows with the shared tokens the step's rows read (rows x prompt), and it pays from ~2^17 of them: 1.07x at
1,024 rows x 256 tokens, 1.20x at 512 x 512, 1.31x at 256 x 1,024, 1.30x at 128 x 1,024, 1.42x at 64 x 2,048, up
to 2.16x at 1,024 x 2,048; at 2^16 it is even (0.98-1.04x) and below it loses (0.69-0.88x), because the plain
kernel then finds a group's prompt in L2 and the extra pass costs more than it saves. Graph steps carry the
plan in static buffers (``cuda_graphs.py``); layers with a sliding window fall back to the plain kernel inside
the hook.
"""

from __future__ import annotations

import torch

from thaw_rl.engine.decode_batch import to_device
from thaw_rl_kernels.cascade_plan import CascadePlan, plan_cascade

CASCADE_MODES = ("auto", "on", "off")
AUTO_MIN_ROWS = 64  # "auto": decode rows in the step, at least (none fewer were measured)
AUTO_MIN_SHARED_READS = 1 << 17  # "auto": shared tokens the step's rows read, summed over its rows, at least


def worth_cascade(plan: CascadePlan) -> bool:
    """Whether ``"auto"`` runs a step with this (host) plan: enough rows, and enough of their contexts in
    blocks their groups share, for reading them once to pay for the second pass (module docstring)."""
    if plan.num_groups == 0 or plan.num_rows < AUTO_MIN_ROWS:
        return False
    return int(plan.tail_start.sum()) >= AUTO_MIN_SHARED_READS


class CascadePlanner:
    """The cascade plan of the current decode batch, on the device, or None where cascade is not used."""

    def __init__(self, mode: str, device: torch.device, block_size: int) -> None:
        if mode not in CASCADE_MODES:
            raise ValueError(f"cascade_attention={mode!r} must be one of {CASCADE_MODES} (default 'auto').")
        self.mode = mode
        self.enabled = mode == "on" or (mode == "auto" and device.type == "cuda")
        self.device = device
        self.block_size = block_size
        self.num_cascade_steps = 0  # decode steps that ran with a plan holding at least one group
        self._host: CascadePlan | None = None
        self._device: CascadePlan | None = None

    def reset(self) -> None:
        """Forget the carried plan (a new decode batch starts, or a step ran without it)."""
        self._host = self._device = None

    def wanted(self, graph_step: bool) -> bool:
        """Whether a step of this kind may use cascade at all (before its plan is known)."""
        return self.enabled and (self.mode == "on" or graph_step)

    def for_rows(self, tables: list[list[int]], seq_lens: list[int]) -> CascadePlan | None:
        """A fresh plan for one eager step's rows (the synchronous step loop: nothing carried)."""
        if not self.wanted(graph_step=False):
            return None
        self.reset()
        self._host = plan_cascade(tables, seq_lens, self.block_size)
        return self._publish()

    def advance(self, keep: list[int], num_prev: int, tables: list[list[int]], seq_lens: list[int],
                graph_step: bool = False) -> CascadePlan | None:
        """The plan of the next async decode step: rows ``keep`` of the previous step, then joining rows.

        ``tables`` and ``seq_lens`` describe all rows of the next step (kept rows first, as ``DecodeBatch``
        orders them); they are read only when rows joined or no plan is carried. ``graph_step``: the step
        is replayed from a CUDA graph (``"auto"`` uses cascade only there).
        """
        if not self.wanted(graph_step):
            self.reset()
            return None
        joined = len(tables) > len(keep)
        if self._host is None or joined or self._host.num_rows != num_prev:
            self._host = plan_cascade(tables, seq_lens, self.block_size)
            self._device = None
        elif len(keep) != num_prev:
            self._host = self._host.select(keep, self.block_size)
            self._device = None
        return self._publish()

    def _publish(self) -> CascadePlan | None:
        if self._host.num_groups == 0 or (self.mode == "auto" and not worth_cascade(self._host)):
            return None
        if self._device is None:
            self._device = _plan_to_device(self._host, self.device)
        self.num_cascade_steps += 1
        return self._device


def _plan_to_device(plan: CascadePlan, device: torch.device) -> CascadePlan:
    """The plan's tensors on ``device`` through pinned non-blocking copies (no host wait on the step in flight)."""
    moved = CascadePlan(**vars(plan))
    for name in ("group_rows", "cu_group_rows", "group_num_blocks", "tail_start"):
        setattr(moved, name, to_device(getattr(plan, name), device))
    return moved
