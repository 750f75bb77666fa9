"""One GEMM for each layer's q, k and v projections in the engine's own forwards.

At decode batch sizes the k and v projections are tiny GEMMs (Qwen2.5-1.5B: 1,536 x 256 each) that cost a
kernel's latency rather than their bytes: on an H200 the 56 of them took 0.28 ms of a 128-row decode step's 2.8 ms
of kernels, q_proj another 0.17 (``profile_decode --kernels``). vLLM merges the three into one
``QKVParallelLinear`` when it loads a model. The engine cannot do that to the model's parameters, which keep
training (optimizers, ``save_pretrained`` and ZeRO/FSDP flattening all see them), so it keeps a fused *copy*:
per layer one (q + k + v, hidden) weight and bias buffer, refreshed from the live parameters at the start of every
engine call that runs the model (``FusedQKV.refresh``: a device copy of those weights, ~0.1 ms for Qwen2.5-1.5B's
176 MB; ~1.6 GB for an 8B model with GQA), so an optimizer step, a weight load or a ``.data`` assignment is never
missed. Only inside the engine's forwards (``FusedQKV.swapped``) are the layer's ``q_proj``/``k_proj``/``v_proj``
replaced by three views of the one GEMM: the model trains, saves and generates with its own modules.

A layer is fused only when its three projections are plain ``nn.Linear`` modules (no LoRA wrapper, no
quantized linear, no hooks, no sharded weight) with matching dtype, device and input size, and bias on all or
none. HF's attention forwards (Llama, Qwen2, Qwen3, Mistral) call the three once each on the same hidden states;
the first call runs the fused GEMM and the other two take their slices of it, in any order.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


class _SharedGEMM:
    """One layer's fused weight/bias and the split output of its last GEMM, handed out once per projection."""

    def __init__(self, projections: tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]) -> None:
        self.projections = projections
        self.splits = [p.out_features for p in projections]
        q = projections[0]
        self.weight = torch.empty(sum(self.splits), q.in_features, dtype=q.weight.dtype, device=q.weight.device)
        self.bias = None if q.bias is None else torch.empty(sum(self.splits), dtype=q.bias.dtype,
                                                            device=q.bias.device)
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self.taken = 0

    def matches(self) -> bool:
        """The live parameters still fit the buffers (same shapes, dtype, device): a copy suffices."""
        q = self.projections[0]
        return (_fusable(self.projections) and q.weight.dtype == self.weight.dtype
                and q.weight.device == self.weight.device and self.splits == [p.out_features for p in self.projections])

    def refresh(self) -> None:
        with torch.no_grad():
            torch.cat([p.weight for p in self.projections], out=self.weight)
            if self.bias is not None:
                torch.cat([p.bias for p in self.projections], out=self.bias)

    def project(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.outputs is None:  # the first of the three calls of this forward
            self.outputs = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
            self.taken = 0
        out = self.outputs[index]
        self.taken += 1
        if self.taken == len(self.splits):
            self.outputs = None
        return out


class _Projection(torch.nn.Module):
    """Stands in for q_proj, k_proj or v_proj inside the engine's forwards: its slice of the shared GEMM."""

    def __init__(self, shared: _SharedGEMM, index: int) -> None:
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features = shared.projections[index].in_features
        self.out_features = shared.projections[index].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.project(self.index, x)


NAMES = ("q_proj", "k_proj", "v_proj")


def _fusable(projections) -> bool:
    first = projections[0]
    return (all(type(p) is torch.nn.Linear and not p._forward_hooks and not p._forward_pre_hooks
                and not hasattr(p.weight, "to_local") and not p.weight.is_meta
                and p.weight.shape == (p.out_features, p.in_features) for p in projections)  # not ZeRO-3-partitioned
            and all(p.weight.dtype == first.weight.dtype and p.weight.device == first.weight.device
                    and p.in_features == first.in_features and (p.bias is None) == (first.bias is None)
                    for p in projections))


class FusedQKV:
    """The fused q/k/v copies of a model's decoder layers (those that qualify) and the swap into its forwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layers: list[tuple[torch.nn.Module, _SharedGEMM, tuple[_Projection, ...]]] = []
        self._build()

    def _build(self) -> None:
        self.layers = []
        layers = getattr(getattr(self.model, "model", None), "layers", None) or []
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            projections = tuple(getattr(attn, name, None) for name in NAMES)
            if attn is None or not _fusable(projections):
                continue
            shared = _SharedGEMM(projections)
            self.layers.append((attn, shared, tuple(_Projection(shared, i) for i in range(len(NAMES)))))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(s.weight.nbytes + (0 if s.bias is None else s.bias.nbytes) for _, s, _ in self.layers)

    def refresh(self) -> bool:
        """Copy the live q/k/v parameters into the fused buffers. Returns True when the buffers had to be rebuilt
        (the parameters changed shape, dtype or device, or were replaced by modules that no longer qualify): the
        caller must then drop CUDA graphs that captured the old buffers' addresses."""
        rebuilt = not all(shared.projections == tuple(getattr(attn, name) for name in NAMES) and shared.matches()
                          for attn, shared, _ in self.layers)
        if rebuilt:
            self._build()
        for _, shared, _ in self.layers:
            shared.refresh()
        return rebuilt

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: each fused layer's q/k/v projections are views of its one GEMM."""
        saved = []
        try:  # straight into _modules: the names are registered submodules already (10x cheaper than setattr)
            for attn, shared, stand_ins in self.layers:
                saved.append((attn, shared.projections))
                shared.outputs = None
                attn._modules.update(zip(NAMES, stand_ins))
            yield
        finally:
            for attn, projections in saved:
                attn._modules.update(zip(NAMES, projections))
