"""Runs the HF model's own forward over one packed varlen batch of many sessions' new tokens.

Each scheduled chunk is ``(session, num_new)``: the tokens ``token_ids[num_computed : num_computed +
num_new]`` of that session go through the model in one flat row, each with its own position, and the
model returns logits only at each chunk's last token (``logits_to_keep`` as an index tensor). The
session's block table must already cover the new tokens (the engine allocates before it calls).

On CUDA, pure-decode steps (every chunk one token) replay a CUDA graph captured per padded batch size
(see ``cuda_graphs.py``); everything else runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from thaw_rl.engine.attention import METADATA_KWARG, AttentionMetadata, model_lock, paged_attention_mode
from thaw_rl.engine.cascade import CascadePlanner
from thaw_rl.engine.fused_qkv import FusedQKV
from thaw_rl_kernels.cascade_plan import CascadePlan
from thaw_rl.engine.kv_cache import PagedKVCache
from thaw_rl.engine.scheduler import Chunk
from thaw_rl.engine.sharding import fsdp2_modules

logger = logging.getLogger(__name__)


def _compile_decoder_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """Regional torch.compile: one compiled callable per decoder layer (identical layers share code).

    HF layers launch ~45 small kernels each (norm upcasts, rotary, residual adds); compiled, their
    elementwise work fuses. The compiled callables are swapped in only for the engine's own forwards
    (``_compiled``), so the model trains uncompiled and with its own attention.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"compile_layers=True needs model.model.layers (Llama/Qwen layout); "
                         f"{type(model).__name__} has none. Leave compile_layers=False.")
    return [(layer, torch.compile(layer._call_impl, dynamic=True)) for layer in layers]


@contextlib.contextmanager
def _compiled(compiled_layers):
    if not compiled_layers:
        yield
        return
    previous = [layer._compiled_call_impl for layer, _ in compiled_layers]
    for layer, fn in compiled_layers:
        layer._compiled_call_impl = fn
    try:
        yield
    finally:
        for (layer, _), prev in zip(compiled_layers, previous):
            layer._compiled_call_impl = prev


# The families the engine runs (ThawEngine refuses others): their HF attention calls go through our hook, and
# their CausalLM forward is the decoder then ``lm_head`` (``plain_lm_head`` relies on that).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def plain_lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when its logits are exactly ``model.model(...)`` then that ``nn.Linear`` (the HF
    Llama/Qwen2/Qwen3/Mistral CausalLM forward), so ``run_model_into`` may run the two itself; else None:
    another class, hooks on the head (PEFT, DeepSpeed), or a sharded (DTensor) weight."""
    head, decoder = getattr(model, "lm_head", None), getattr(model, "model", None)
    if type(head) is not torch.nn.Linear or decoder is None:
        return None
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return None
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head.weight, "to_local"):
        return None
    return head


@dataclass
class PackedBatch:
    """Host-built tensors of one step, before they move to the device."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_blocks: torch.Tensor  # (T,) int64
    slot_offsets: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32
    cu_seqlens_q: torch.Tensor  # (S+1,) int32
    max_seqlen_q: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def pack(chunks: list[Chunk], block_size: int, table_width: int | None = None) -> PackedBatch:
    ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    cu = [0]
    width = table_width or max(-(-c.end // block_size) for c in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)  # (S, W); padding points at the null block
    for i, c in enumerate(chunks):
        s = c.session
        assert len(s.block_table) * block_size >= c.end, f"{s} has no blocks for tokens up to {c.end}"
        ids.extend(s.token_ids[c.start : c.end])
        for p in range(c.start, c.end):
            positions.append(p)
            slot_blocks.append(s.block_table[p // block_size])
            slot_offsets.append(p % block_size)
        cu.append(cu[-1] + c.num_new)
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_blocks=torch.tensor(slot_blocks, dtype=torch.int64),
        slot_offsets=torch.tensor(slot_offsets, dtype=torch.int64),
        block_tables=tables,
        seq_lens=torch.tensor([c.end for c in chunks], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=max(c.num_new for c in chunks),
    )


class ModelRunner:
    """Owns the forward pass: packing, device transfer, the attention-mode switch, CUDA graphs."""

    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, use_cuda_graphs: bool, max_num_seqs: int,
                 max_blocks_per_seq: int, compile_layers: bool = False, cascade_attention: str = "off",
                 fused_qkv: FusedQKV | None = None) -> None:
        self.model = model
        model_lock(model)  # from now on the model's own forwards wait for ours (attention.py)
        # inference_mode, except under FSDP2: its pre-forward unshard reads the parameters' version
        # counters, which inference tensors do not have (TRL's generate path uses no_grad there too).
        self.grad_off = torch.no_grad if fsdp2_modules(model) else torch.inference_mode
        self.compiled_layers = _compile_decoder_layers(model) if compile_layers else None
        # engine/fused_qkv.py; None also when no layer qualifies (LoRA-wrapped or quantized projections)
        self.fused_qkv = fused_qkv if fused_qkv is not None and fused_qkv.num_layers else None
        self.lm_head = plain_lm_head(model)
        self.direct_lm_head = self.lm_head is not None  # DecodeGraphs turns it off if the bits ever differ
        self.kv_cache = kv_cache
        self.block_size = kv_cache.spec.block_size
        self.device = kv_cache.device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.graphs = None
        self.graphs_failed: str | None = None  # the capture error, once graphs were given up
        self.cascade = CascadePlanner(cascade_attention, self.device, self.block_size)
        if use_cuda_graphs:
            from thaw_rl.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs=max_num_seqs)

    def refresh_weights(self) -> bool:
        """Bring the engine's own copies of the weights (the fused q/k/v buffers) up to the live parameters; the
        engine calls it before every run of the model. True when buffers moved, so captured graphs must go."""
        return self.fused_qkv.refresh() if self.fused_qkv is not None else False

    @contextlib.contextmanager
    def _engine_forward(self):
        """The model as the engine runs it: our attention hook, fused q/k/v projections, compiled layers."""
        fused = self.fused_qkv.swapped() if self.fused_qkv is not None else contextlib.nullcontext()
        with paged_attention_mode(self.model), fused, _compiled(self.compiled_layers):
            yield

    def metadata(self, batch: PackedBatch) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_blocks=batch.slot_blocks.to(dev, non_blocking=True),
            slot_offsets=batch.slot_offsets.to(dev, non_blocking=True),
            block_tables=batch.block_tables.to(dev, non_blocking=True),
            seq_lens=batch.seq_lens.to(dev, non_blocking=True),
            cu_seqlens_q=batch.cu_seqlens_q.to(dev, non_blocking=True),
            max_seqlen_q=batch.max_seqlen_q,
        )

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                  logits_index: torch.Tensor | int) -> torch.Tensor:
        """The HF forward over one packed row; returns (S, V) logits in the model's dtype."""
        with self._engine_forward():
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=logits_index,
                **{METADATA_KWARG: meta},
            )
        return out.logits[0]

    def run_model_into(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       out: torch.Tensor) -> None:
        """``run_model`` over one decode token per row with the logits written into ``out`` (n, V).

        With a plain LM head (``plain_lm_head``) the decoder runs alone and the head's GEMM writes straight
        into ``out``, the buffer every captured graph shares: no (n, V) copy per step (0.13 ms of a 1,024-row
        decode step's device time on an H200, for 311 MB of bf16 logits). Otherwise the model's own forward
        runs and its logits are copied. Callers check once that both give the same bits (``DecodeGraphs``).
        """
        head = self.lm_head if self.direct_lm_head else None
        if head is None:
            out.copy_(self.run_model(input_ids, positions, meta, 0))
            return
        with self._engine_forward():
            hidden = self.model.model(
                input_ids=input_ids[None], position_ids=positions[None], use_cache=False, **{METADATA_KWARG: meta},
            ).last_hidden_state[0]  # (n, H), after the final norm
        if head.bias is None:
            torch.mm(hidden, head.weight.t(), out=out)
        else:
            torch.addmm(head.bias, hidden, head.weight.t(), out=out)

    def settle_direct_lm_head(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                              forward_logits: torch.Tensor, out: torch.Tensor, batch: int) -> None:
        """Keep ``direct_lm_head`` only if ``run_model_into`` writes exactly ``forward_logits`` (the model's own
        forward of the same step) into ``out``: the same dtype and the same bits. ``DecodeGraphs`` asks before
        its first capture. A mixed-precision wrapper on ``model.forward`` (accelerate's autocast +
        convert_outputs_to_fp32, which TRL trainers with bf16=True install) returns fp32 logits where the head
        computes bf16: writing the head's GEMM into that buffer failed every capture (dtype mismatch), so the
        engine decoded without graphs. Then, and whenever the bits differ, the graphs copy the forward's logits."""
        if not self.direct_lm_head:
            return
        head_dtype = self.lm_head.weight.dtype
        if forward_logits.dtype != head_dtype or out.dtype != head_dtype:
            self.direct_lm_head = False
            logger.info("thaw-rl: the model's forward returns %s logits but its LM head computes %s (a mixed-"
                        "precision wrapper on forward?); decode graphs copy the forward's logits.",
                        forward_logits.dtype, head_dtype)
            return
        self.run_model_into(input_ids, positions, meta, out)
        if not torch.equal(out, forward_logits):
            self.direct_lm_head = False
            logger.info("thaw-rl: the LM head run on its own differs from the model's forward at batch %d; "
                        "decode graphs copy the forward's logits instead.", batch)

    def _give_up_graphs(self) -> None:
        """A capture failed: run every later step eagerly (same outputs, slower), and say so once."""
        self.graphs_failed = self.graphs.capture_error
        self.graphs = None
        logger.warning(
            "thaw-rl: CUDA graph capture failed (%s); this engine decodes without CUDA graphs from now on (same "
            "output, slower). Usually something synchronizes the device inside the model's forward (a forward "
            "hook: DeepSpeed's are paused by the thaw-rl trainers); use_cuda_graphs=False (ThawGRPOConfig."
            "engine_cuda_graphs=False) skips the attempt.", self.graphs_failed)

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits (S, V) float32 at the last new token of each chunk."""
        with self.grad_off():
            return self._forward(chunks)

    def decodes_eagerly(self, num_rows: int) -> bool:
        """Whether a pure-decode step of this many rows runs eagerly (no CUDA graph replays it)."""
        return self.graphs is None or not self.graphs.fits(num_rows)

    def forward_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                       cascade: CascadePlan | None = None) -> torch.Tensor:
        """Logits (n, V) of one decode token per row, from inputs already on the device, in the model's dtype
        (``sample`` upcasts them in its kernel; from a graph replay they are overwritten by the next replay).

        The async decode loop (``decode_batch.py``) keeps these tensors on the device between steps; the
        slot of each new token and the context lengths are derived here by device ops, so nothing is built
        on the host. ``block_tables`` (n, W) need only cover each row's blocks up to its position. ``cascade``
        (from ``self.cascade``): this step's plan, eager or replayed (``cuda_graphs.py``).
        """
        with self.grad_off():
            slot_blocks = block_tables.gather(1, (positions // self.block_size)[:, None])[:, 0].long()
            slot_offsets = positions % self.block_size
            seq_lens = (positions + 1).to(torch.int32)
            if self.graphs is not None and self.graphs.fits(input_ids.shape[0]):
                logits = self.graphs.forward_decode(input_ids, positions, slot_blocks, slot_offsets, block_tables,
                                                    seq_lens, cascade=cascade)
                if logits is not None:
                    return logits
                self._give_up_graphs()
            n = input_ids.shape[0]
            meta = AttentionMetadata(
                kv_cache=self.kv_cache, slot_blocks=slot_blocks, slot_offsets=slot_offsets, block_tables=block_tables,
                seq_lens=seq_lens, cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=self.device),
                max_seqlen_q=1, cascade=cascade,
            )
            last = torch.arange(n, device=self.device)  # every token is its row's last (as pack() gives)
            return self.run_model(input_ids, positions, meta, last)

    def _forward(self, chunks: list[Chunk]) -> torch.Tensor:
        if self.graphs is not None and all(c.num_new == 1 for c in chunks) and self.graphs.fits(len(chunks)):
            logits = self.graphs.forward(chunks)
            if logits is not None:
                return logits
            self._give_up_graphs()
        batch = pack(chunks, self.block_size)
        meta = self.metadata(batch)
        if batch.max_seqlen_q == 1 and batch.num_tokens == batch.num_seqs:  # pure decode: maybe cascade
            meta.cascade = self.cascade.for_rows([c.session.block_table for c in chunks], [c.end for c in chunks])
        last = (batch.cu_seqlens_q[1:] - 1).to(self.device)  # (S,)
        ids = batch.input_ids.to(self.device, non_blocking=True)
        pos = batch.positions.to(self.device, non_blocking=True)
        return self.run_model(ids, pos, meta, last).float()
