"""CUDA graphs for pure-decode steps.

An eager HF decode step launches hundreds of small kernels from Python; on a GPU that costs more than
the arithmetic at GRPO batch sizes (``model.generate`` sits near 80 ms a step whatever the batch). We
capture the model's forward once per padded batch size (1, 2, 4, 8, then multiples of 8 up to
``max_num_seqs``) over static input buffers, and replay it. Padding rows write their KV into the
reserved null block 0 and attend to it alone, so they never touch a live session's blocks.

The graphs read the KV cache and the weights in place: a weight update that keeps parameter storage
(``param.data.copy_``, an optimizer step) needs no re-capture; one that swaps tensors does (call
``ThawEngine.invalidate_cuda_graphs``).

Steps with cascade attention (``engine/cascade.py``) replay graphs of their own: the plan's tensors are copied
into static buffers, padded to a capture's sizes (``cascade_graph_key``), and the kernels read them on the
device. Only the plan's host-side bounds (group count, rows of the largest group, shared blocks), rounded up to
powers of two, pick a capture, so a GRPO call whose groups shrink as rows finish replays a handful of them.
"""

from __future__ import annotations

import torch
import triton

from thaw_rl.engine.attention import AttentionMetadata
from thaw_rl_kernels.cascade_plan import CascadePlan


def _batch_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, then steps of 8 to 256, 16 to 512, 32 to 1,024, 64 beyond, and max_num_seqs.

    Every decode batch up to ``max_num_seqs`` replays a graph, padded by at most ~6% (vLLM's ladder is
    similar); coarser steps above 256 keep the number of captures of a shrinking GRPO batch (1,024 rows
    finishing one by one) near 80 instead of 256.
    """
    sizes = [1, 2, 4]
    step, size = 8, 8
    while size <= max_num_seqs:
        sizes.append(size)
        if size >= 32 * step:  # 256 -> 16, 512 -> 32, 1,024 -> 64, 2,048 -> 128
            step *= 2
        size += step
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


def cascade_graph_key(plan: CascadePlan, bs: int, width: int) -> tuple[int, int, int, int]:
    """The capture a (device) plan of a ``bs``-row padded step replays: (bs, groups, rows of a group, shared
    blocks), the last three the plan's bounds rounded up to powers of two and capped by what the step can hold
    (a group has >= 2 rows; ``width`` block-table columns). They size the grids and pick the tilings only."""
    pow2 = triton.next_power_of_2  # a published plan has >= 1 group of >= 2 rows sharing >= 1 block
    groups = min(pow2(plan.num_groups), max(1, bs // 2))
    return bs, groups, min(pow2(plan.max_group_rows), bs), min(pow2(plan.max_shared_blocks), width)


def pad_plan_into(buffers: CascadePlan, plan: CascadePlan, key: tuple[int, int, int, int]) -> CascadePlan:
    """Copy ``plan`` into the static ``buffers`` (sized for the largest step) padded to ``key``'s sizes, as
    ``CascadePlan.padded`` lays it out: rows past the plan's are in no group (tail from 0), groups past its
    are empty. Returns the views of ``buffers`` a capture under ``key`` reads (entries of ``group_rows`` past
    the plan's grouped rows are never read)."""
    bs, groups, group_rows, shared_blocks = key
    n, r, g = plan.num_rows, plan.group_rows.shape[0], plan.num_groups
    if n > bs or g > groups:
        raise ValueError(f"a plan of {n} rows and {g} groups does not fit the capture {key}.")
    buffers.group_rows[:r].copy_(plan.group_rows)
    buffers.cu_group_rows[: g + 1].copy_(plan.cu_group_rows)
    buffers.cu_group_rows[g + 1 : groups + 1].fill_(r)
    buffers.group_num_blocks[:g].copy_(plan.group_num_blocks)
    buffers.group_num_blocks[g:groups].zero_()
    buffers.tail_start[:n].copy_(plan.tail_start)
    buffers.tail_start[n:bs].zero_()
    return cascade_view(buffers, key)


def cascade_view(buffers: CascadePlan, key: tuple[int, int, int, int]) -> CascadePlan:
    bs, groups, group_rows, shared_blocks = key
    return CascadePlan(buffers.group_rows[:bs], buffers.cu_group_rows[: groups + 1], buffers.group_num_blocks[:groups],
                       buffers.tail_start[:bs], max_group_rows=group_rows, max_shared_blocks=shared_blocks)


class DecodeGraphs:
    """Lazily captured graphs, one per padded batch size; all share one memory pool."""

    def __init__(self, runner, max_num_seqs: int) -> None:
        self.runner = runner
        self.sizes = _batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        width = runner.max_blocks_per_seq
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.slot_blocks = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.slot_offsets = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(self.max_bs, width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self._host_meta = torch.zeros(5, self.max_bs, dtype=torch.int64).pin_memory()
        self._host_meta_np = self._host_meta.numpy()
        self._host_table = torch.zeros(self.max_bs * width, dtype=torch.int32).pin_memory()
        self._host_table_np = self._host_table.numpy()
        # plain steps by padded size; cascade steps by cascade_graph_key
        self.graphs: dict[int | tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cascade_buffers: CascadePlan | None = None  # static plan buffers, made at the first cascade step
        self._cascade_filled: tuple | None = None  # (plan, key) last copied into them
        self.pool = None
        self.logits: torch.Tensor | None = None  # (max_bs, V): every graph's output (see _capture)
        self.capture_error: str | None = None  # why a capture failed (the runner then runs eagerly)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def _padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _meta(self, bs: int, key: tuple | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            kv_cache=self.runner.kv_cache,
            slot_blocks=self.slot_blocks[:bs],
            slot_offsets=self.slot_offsets[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            max_seqlen_q=1,
            cascade=None if key is None else cascade_view(self.cascade_buffers, key),
        )

    def _capture(self, bs: int, key: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture size ``bs``; its logits land in the one output buffer all sizes share.

        With up to ~80 sizes captured (a 2,048-row ladder) per-graph outputs would pin tens of GB (bs x
        vocab each), where one shared buffer costs max_bs x vocab once. The LM head's GEMM writes into it
        directly (``ModelRunner.run_model_into``) once a warm-up showed that gives the forward's exact bits;
        otherwise the graph copies the forward's logits there.
        """
        runner = self.runner
        run = lambda: runner.run_model(self.input_ids[:bs], self.positions[:bs], self._meta(bs, key), 0)
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (allocator, autotuning) outside the graph
                warm = run()
        torch.cuda.current_stream().wait_stream(stream)
        if self.logits is None:  # outside the graph's pool: it outlives every capture
            self.logits = torch.empty(self.max_bs, warm.shape[-1], dtype=warm.dtype, device=warm.device)
        runner.settle_direct_lm_head(self.input_ids[:bs], self.positions[:bs], self._meta(bs, key), warm,
                                     self.logits[:bs], bs)
        del warm
        graph = torch.cuda.CUDAGraph()
        # thread_local: what other threads do meanwhile (NCCL's watchdog polling events, a data loader)
        # cannot invalidate this capture; a sync in this thread still does (see ModelRunner._give_up_graphs).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            runner.run_model_into(self.input_ids[:bs], self.positions[:bs], self._meta(bs, key), self.logits[:bs])
        if self.pool is None:
            self.pool = graph.pool()
        return graph, self.logits

    def _fill(self, chunks) -> int:
        """Copy this step's decode metadata into the static buffers; returns the padded batch size.

        Host rows are written through numpy views of persistent pinned buffers (no per-step tensor
        construction or pinning), and only the block-table columns in use are copied: the kernel reads
        a row only up to its sequence length. Reusing the host buffers is safe because every step ends
        in a device sync (the sampled tokens are read back) before the next fill.
        """
        n = len(chunks)
        bs = self._padded(n)
        block_size = self.runner.block_size
        width = max(len(c.session.block_table) for c in chunks)
        meta = self._host_meta_np[:, :bs]  # (5, bs): ids, positions, slot blocks, slot offsets, seq lens
        meta[:, n:] = 0
        meta[4, n:] = 1  # padding rows: one token in the null block
        table = self._host_table_np[: bs * width].reshape(bs, width)
        table[n:] = 0
        for i, c in enumerate(chunks):
            s = c.session
            p = c.start
            bt = s.block_table
            meta[0, i] = s.token_ids[p]
            meta[1, i] = p
            meta[2, i] = bt[p // block_size]
            meta[3, i] = p % block_size
            meta[4, i] = p + 1
            table[i, : len(bt)] = bt
        dev_meta = self._host_meta[:, :bs].to(self.runner.device, non_blocking=True)
        self.input_ids[:bs].copy_(dev_meta[0])
        self.positions[:bs].copy_(dev_meta[1])
        self.slot_blocks[:bs].copy_(dev_meta[2])
        self.slot_offsets[:bs].copy_(dev_meta[3])
        self.seq_lens[:bs].copy_(dev_meta[4])
        host_table = self._host_table[: bs * width].view(bs, width)
        self.block_tables[:bs, :width].copy_(host_table.to(self.runner.device, non_blocking=True))
        return bs

    def forward_decode(self, input_ids, positions, slot_blocks, slot_offsets, block_tables, seq_lens,
                       cascade: CascadePlan | None = None) -> torch.Tensor | None:
        """``forward`` for inputs already on the device (the async decode loop): device-to-device copies
        into the static buffers, padding rows reset to the null block, no host work per row. Returns the
        logits in the model's dtype, a view the next replay overwrites: the sampler reads them first, on the
        same stream (an fp32 copy of 1,024 x 152k logits cost 0.2 ms a step on an H200). ``cascade``: this
        step's plan on the device; the step then replays a cascade capture (module docstring)."""
        n = input_ids.shape[0]
        bs = self._padded(n)
        width = block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_blocks[:n].copy_(slot_blocks)
        self.slot_offsets[:n].copy_(slot_offsets)
        self.seq_lens[:n].copy_(seq_lens)
        self.block_tables[:n, :width].copy_(block_tables)
        if bs > n:  # padding rows: one token in the null block (stale rows would write into live blocks)
            for buf in (self.input_ids, self.positions, self.slot_blocks, self.slot_offsets):
                buf[n:bs].zero_()
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].zero_()
        return self._replay(bs, n, self._fill_cascade(cascade, bs))

    def _fill_cascade(self, plan: CascadePlan | None, bs: int) -> tuple | None:
        """The cascade capture key of this step (None: a plain step), its plan copied into the static buffers
        unless the same plan was copied for the same key last (a plan is carried across steps unchanged)."""
        if plan is None:
            return None
        key = cascade_graph_key(plan, bs, self.block_tables.shape[1])
        if self._cascade_filled is not None and self._cascade_filled[0] is plan and self._cascade_filled[1] == key:
            return key
        if self.cascade_buffers is None:
            zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=self.runner.device)  # noqa: E731
            half = self.max_bs // 2 + 1
            self.cascade_buffers = CascadePlan(zeros(self.max_bs), zeros(half + 1), zeros(half), zeros(self.max_bs),
                                               max_group_rows=0, max_shared_blocks=0)
        pad_plan_into(self.cascade_buffers, plan, key)
        self._cascade_filled = (plan, key)
        return key

    def _replay(self, bs: int, n: int, key: tuple | None = None) -> torch.Tensor | None:
        """The first n rows of the shared output buffer, in the model's dtype: valid until the next replay."""
        slot = bs if key is None else key
        if slot not in self.graphs:
            try:
                self.graphs[slot] = self._capture(bs, key)
            except RuntimeError as err:  # torch.AcceleratorError: the capture was invalidated, nothing replayable
                self.capture_error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                return None
        graph, logits = self.graphs[slot]
        graph.replay()
        return logits[:n]

    def forward(self, chunks) -> torch.Tensor | None:
        """Logits (n, V) float32 by graph replay; None if this batch size's capture failed (run eagerly)."""
        logits = self._replay(self._fill(chunks), len(chunks))
        return None if logits is None else logits.float()
