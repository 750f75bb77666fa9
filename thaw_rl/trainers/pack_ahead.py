"""Packs of a generation batch's micro-batches, built on the host while the device trains.

Why: packing reads the rows' token ids on the host. Read from a micro-batch's device tensors when its loss
forward starts (what ``packed_logps`` does alone), that read synchronizes the device: the GPU has just been
handed the previous micro-batch's backward, and then idles while the host waits, copies and packs. Profiled
inside a GRPO step on the H200 (Qwen2.5-1.5B shape, micro-batches of four 2,048 + 16 x 512 groups): ~100 ms of
host packing and block-mask building per micro-batch, with the GPU idle.

TRL builds every micro-batch of a generation batch at once (``_buffered_inputs``, right after generation and
scoring, when the device is idle anyway). ``prepare`` brings all their token ids to the host then, in one
read per micro-batch. Each micro-batch is packed either when its loss asks for it (``take``: the first one)
or, for the next one, right after the current training step has queued its backward (``prepare_next``): the
host packs while the device computes. The packed tensors and masks reach the device through pinned,
non-blocking copies and device-side ops, so nothing on this path waits for the device.

A pack is found again by the identity of the micro-batch dict TRL hands to ``compute_loss`` and checked
against the shape of the rows the scoring pass gets; anything else (old/reference logprob passes, a
subclass scoring other rows) packs on the spot as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thaw_rl.trainers.prefix_packing import pack_rows
from thaw_rl.trainers.shared_prefix import PreparedPack, ready_chunks

_NOT_PACKED = object()


@dataclass
class _MicroBatch:
    inputs: dict  # the dict TRL passes to compute_loss (kept so its id cannot be reused while listed)
    input_ids: torch.Tensor  # (B, L) on the host: prompt then completion columns
    attention_mask: torch.Tensor  # (B, L) on the host
    num_completion_columns: int
    prepared: object = _NOT_PACKED  # PreparedPack, or None when the rows are not in TRL's layout


class PackAhead:
    """The packs of the micro-batches TRL buffered from one generation batch (see the module docstring)."""

    def __init__(self, device: torch.device, mask_kind: str, max_tokens: int | None) -> None:
        self.device = torch.device(device)
        self.mask_kind = mask_kind
        self.max_tokens = max_tokens
        self.source: list[dict] | None = None  # TRL's buffer the entries were read from
        self._entries: dict[int, _MicroBatch] = {}
        self._order: list[int] = []
        self._config = None
        self.num_used = 0  # loss forwards that ran on a pack made here (the trainer counts them)

    def prepare(self, micro_batches: list[dict], config) -> None:
        """Read every micro-batch's rows to the host (call right after TRL buffered them)."""
        self.source, self._config = micro_batches, config
        self._entries, self._order = {}, []
        for inputs in micro_batches:
            if not all(key in inputs for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")):
                continue
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1).cpu()  # (B, L)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1).cpu()
            self._entries[id(inputs)] = _MicroBatch(inputs, ids, mask, inputs["completion_ids"].size(1))
            self._order.append(id(inputs))

    def take(self, inputs: dict) -> PreparedPack | None:
        """The prepared pack of ``inputs`` (packed now if it was not yet), or None when ``inputs`` is not a
        prepared micro-batch or its rows are not in TRL's layout."""
        entry = self._entries.get(id(inputs))
        if entry is None or entry.inputs is not inputs:
            return None
        self._pack(entry)
        return entry.prepared

    def prepare_next(self) -> None:
        """Pack the first micro-batch not packed yet (host work; call while the device is busy)."""
        for key in self._order:
            entry = self._entries[key]
            if entry.prepared is _NOT_PACKED:
                self._pack(entry)
                return

    def _pack(self, entry: _MicroBatch) -> None:
        if entry.prepared is not _NOT_PACKED:
            return
        with torch.profiler.record_function("thaw.pack_ahead"):
            batch = pack_rows(entry.input_ids, entry.attention_mask, entry.num_completion_columns,
                              max_tokens=self.max_tokens)  # on the host: the rows are CPU tensors
            if batch is None:
                entry.prepared = None
                return
            max_positions = [int(c.position_ids.max()) if c.num_tokens else 0 for c in batch.chunks]
            on_device = batch.to(self.device, non_blocking=True)  # pinned copies on CUDA
            entry.prepared = PreparedPack(on_device, ready_chunks(on_device, self._config, self.mask_kind,
                                                                  self.device, max_positions),
                                          tuple(entry.input_ids.shape))

