"""When decode steps use cascade (shared-prefix) attention, and the plan they use, kept across steps.

``thaw_rl_kernels.cascade_plan`` finds the rows of a decode batch that share leading KV blocks (a GRPO
group's prompt). Building that plan is host work (~1 ms at 128 rows, ~10 ms at 1,024), so it is built
when rows join the batch and carried otherwise: a plan stays exact while rows only grow (new blocks are
never shared) and while rows only leave (``CascadePlan.select``).

Modes (``ThawEngine(cascade_attention=...)``):
- ``"off"``: never.
- ``"on"``: every eagerly run pure-decode step whose batch has a group (on CPU through the torch reference,
  which is exact but not faster: it is there to test the wiring).
- ``"auto"``: as "on" on CUDA when ``AUTO_ON_CUDA`` is True, else off. It is False until an H200 receipt of
  ``benchmarks/paged_attention.py --cascade`` (and an engine run) shows cascade faster at GRPO shapes: the
  Triton kernels are tested on CPU under the interpreter only so far.
Decode steps replayed from a CUDA graph never use it yet (the plan would have to live in the graphs' static
buffers); nor do layers with a sliding window (the attention hook falls back to the plain kernel).
"""

from __future__ import annotations

import torch

from thaw_rl.engine.decode_batch import to_device
from thaw_rl_kernels.cascade_plan import CascadePlan, plan_cascade

CASCADE_MODES = ("auto", "on", "off")
AUTO_ON_CUDA = False  # flip by measurement (see the module docstring)


class CascadePlanner:
    """The cascade plan of the current decode batch, on the device, or None where cascade is not used."""

    def __init__(self, mode: str, device: torch.device, block_size: int) -> None:
        if mode not in CASCADE_MODES:
            raise ValueError(f"cascade_attention={mode!r} must be one of {CASCADE_MODES} (default 'auto').")
        self.enabled = mode == "on" or (mode == "auto" and device.type == "cuda" and AUTO_ON_CUDA)
        self.device = device
        self.block_size = block_size
        self.num_cascade_steps = 0  # decode steps that ran with a plan holding at least one group
        self._host: CascadePlan | None = None
        self._device: CascadePlan | None = None

    def reset(self) -> None:
        """Forget the carried plan (a new decode batch starts, or a step ran without it)."""
        self._host = self._device = None

    def for_rows(self, tables: list[list[int]], seq_lens: list[int]) -> CascadePlan | None:
        """A fresh plan for one step's rows (the synchronous step loop: nothing carried)."""
        if not self.enabled:
            return None
        self.reset()
        self._host = plan_cascade(tables, seq_lens, self.block_size)
        return self._publish()

    def advance(self, keep: list[int], num_prev: int, tables: list[list[int]], seq_lens: list[int]
                ) -> CascadePlan | None:
        """The plan of the next async decode step: rows ``keep`` of the previous step, then joining rows.

        ``tables`` and ``seq_lens`` describe all rows of the next step (kept rows first, as ``DecodeBatch``
        orders them); they are read only when rows joined or no plan is carried.
        """
        if not self.enabled:
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
        if self._host.num_groups == 0:
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
