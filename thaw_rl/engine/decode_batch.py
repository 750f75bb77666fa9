"""The rows of a run of pure-decode steps, kept on the device between steps; sampled tokens come back late.

Why: a synchronous decode step is forward -> sample -> ``.tolist()`` (the host waits for the GPU) ->
Python builds the next step's input ids, positions, slots and block-table rows -> copy them up. At
1,024 rows on an H200 that host work was ~8 ms of a 28 ms step, all of it with the GPU idle. Here
(the pattern of vLLM v1's async scheduling and persistent input batch, SGLang's overlap scheduler and
TensorRT-LLM's overlap scheduler):

- ``DecodeBatch`` keeps each row's next input token, position and block-table row as device tensors.
  The next step's inputs are made there by device ops: the sampled tokens *are* the next input ids,
  positions advance by one, the slot of each new token is read from the device block table. The host
  sends only what it alone knows, as small pinned non-blocking copies: which rows stay (an index, only
  when the row set changes), rows that join, and new blocks (one ``(row, column, block)`` triple per row
  crossing a block boundary).
- ``LateTokens`` copies a step's tokens, logprobs and entropies into pinned host memory without
  blocking and records an event; the engine waits on it only after it has launched the next step, so
  the host's bookkeeping (appending tokens, stop checks, hashing full blocks, allocating blocks) runs
  while the GPU computes.

Nothing here blocks the host on the device: no ``.item()``, ``.tolist()``, ``.cpu()`` or pageable
host-to-device copy (a pageable copy synchronizes the stream, i.e. waits for the step in flight). On
CPU the same code runs with CPU tensors (the copies are plain copies), which is what the tests cover.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from thaw_rl.engine.sampling import SamplingBatch, SamplingParams


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: pinned, then an asynchronous copy.

    The pinned staging buffer comes from PyTorch's caching host allocator, which does not hand it out
    again until the copy that reads it has completed, so it may be dropped right away.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _padded_tables(tables: list[list[int]], min_width: int) -> torch.Tensor:
    """(J, W) int32 host tensor of the block tables, zero-padded to the longest (at least ``min_width``).

    Built in numpy: a torch.tensor per row cost ~10 ms for the 1,024 rows joining a GRPO step's first decode step.
    """
    lens = list(map(len, tables))
    width = max(min_width, max(lens))
    if min(lens) == width:
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=width * len(tables))
        return torch.from_numpy(flat.reshape(len(tables), width))
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return torch.from_numpy(out)


class LateTokens:
    """One step's sampled tokens, logprobs and entropies on their way to the host (read one step later)."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor, entropies: torch.Tensor) -> None:
        # One (3, n) float64 buffer, one copy: float64 holds every token id (< 2**53) and every float32 exactly.
        packed = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64), entropies.to(torch.float64)])
        self._event = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            packed = host
        self._host = packed

    def wait(self) -> tuple[list[int], list[float], list[float]]:
        """Block until the copy landed; (tokens, logprobs, entropies) as Python lists."""
        if self._event is not None:
            self._event.synchronize()
        tokens, logprobs, entropies = self._host.tolist()
        return [int(t) for t in tokens], logprobs, entropies


class DecodeBatch:
    """Per-row decode inputs on the device: next input ids, positions, block tables, sampling tensors.

    Rows are ordered as the engine lists them (``advance`` says which previous rows stay, in order, and
    which join at the end). Block tables are kept with spare columns (grown by doubling) so a row that
    crosses a block boundary is one scatter, not a re-copy of the table.
    """

    def __init__(self, device: torch.device, block_size: int, vocab_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.num_rows = 0
        self.input_ids = torch.zeros(0, dtype=torch.int64, device=device)  # (n,) the token each row computes next
        self.positions = torch.zeros(0, dtype=torch.int64, device=device)  # (n,) its position
        self.block_tables = torch.zeros(0, 1, dtype=torch.int32, device=device)  # (n, capacity)
        self.sampling: SamplingBatch | None = None
        self._params: list[SamplingParams] = []

    def advance(
        self,
        sampled: torch.Tensor | None,
        keep: list[int],
        joining: list[tuple[int, int, list[int], SamplingParams, int]],
        new_blocks: list[tuple[int, int, int]],
    ) -> None:
        """Make the next step's rows: previous rows ``keep`` (indices, in order), then ``joining`` ones.

        ``sampled`` (n_prev,) are the tokens the previous step drew, still on the device: kept rows compute
        them next, one position further. ``joining`` rows are ``(token, position, block_table, params,
        seed)`` from the host. ``new_blocks`` are ``(row, column, block_id)`` writes into the new rows'
        tables (a row that reached a new block).
        """
        dev, n_prev = self.device, self.num_rows
        if len(keep) != n_prev:  # rows left: gather the survivors (one small index copy)
            idx = to_device(torch.tensor(keep, dtype=torch.int64), dev)
            ids = sampled.index_select(0, idx) if sampled is not None else sampled
            pos = self.positions.index_select(0, idx)
            tables = self.block_tables.index_select(0, idx)
            sampling = self.sampling.select(idx) if self.sampling is not None else None
            params = [self._params[i] for i in keep]
        else:
            ids, pos, tables, sampling, params = sampled, self.positions, self.block_tables, self.sampling, self._params
        if keep:
            pos = pos + 1
        else:
            ids = sampling = None
            params = []
        if joining:
            host_tables = _padded_tables([t for _, _, t, _, _ in joining], tables.shape[1])
            width = host_tables.shape[1]
            host_ids = torch.tensor([x for t, p, _, _, _ in joining for x in (t, p)],
                                    dtype=torch.int64).view(-1, 2)  # (J, 2)
            joined = to_device(host_ids, dev)
            join_params = [p for _, _, _, p, _ in joining]
            join_sampling = SamplingBatch.build(
                params=join_params, seeds=[s for _, _, _, _, s in joining], positions=[0] * len(joining),
                seen_token_ids=[[] for _ in joining], vocab_size=self.vocab_size, device=torch.device("cpu"),
            ).to(dev)
            if keep:
                tables = _widen(tables, width)
                ids = torch.cat([ids, joined[:, 0]])
                pos = torch.cat([pos, joined[:, 1]])
                tables = torch.cat([tables, to_device(host_tables, dev)])
                sampling = SamplingBatch.concat(sampling, join_sampling)
            else:
                ids, pos, tables, sampling = joined[:, 0], joined[:, 1], to_device(host_tables, dev), join_sampling
            params = params + join_params
        if len(params) != n_prev or joining:
            sampling.refresh_flags(params, self.vocab_size)
        if new_blocks:
            need = max(col for _, col, _ in new_blocks) + 1
            if need > tables.shape[1]:
                tables = _widen(tables, max(need, 2 * tables.shape[1]))
            writes = to_device(torch.tensor(new_blocks, dtype=torch.int64), dev)  # (k, 3)
            tables.index_put_((writes[:, 0], writes[:, 1]), writes[:, 2].to(torch.int32))
        self.input_ids, self.positions, self.block_tables = ids, pos, tables
        self.sampling, self._params, self.num_rows = sampling, params, len(params)

    def sampling_for_step(self) -> SamplingBatch:
        """The sampling batch of this step: each row samples the token after its input position."""
        return self.sampling.at_positions(self.positions + 1)


def _widen(tables: torch.Tensor, width: int) -> torch.Tensor:
    if tables.shape[1] >= width:
        return tables
    out = tables.new_zeros(tables.shape[0], width)
    out[:, : tables.shape[1]] = tables
    return out
