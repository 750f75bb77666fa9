"""A cheap digest of a model's weights, so KV computed with other weights is refused, not reused.

The engine's ``weight_version`` says which weights the caller *declares*; the digest checks what the
weights *are*: two models of one architecture with different weights, or an in-place optimizer step
nobody announced. Hashing every byte of a 7B model per call is far too slow, so the digest samples 8
evenly spaced elements of every parameter (strided views, one ``cat``, one device-to-host copy of a
few KiB). An optimizer step or a weight load changes (almost) every element, so it changes the digest;
an update that leaves every sampled element bit-identical would go unnoticed, which is why the version
rule stays the primary one.
"""

from __future__ import annotations

import hashlib
import weakref

import torch

SAMPLES_PER_PARAMETER = 8


def weights_digest(model: torch.nn.Module) -> str:
    """Hex digest of 8 evenly spaced elements of every parameter (in ``named_parameters`` order).

    The engine asks for it on every snapshot, restore and generate (~290 parameters in an 8B model: a few ops
    per parameter cost milliseconds). So where every parameter is a plain contiguous tensor, each call takes
    one strided view per parameter (``as_strided``; which parameters and how many samples is planned once per
    model, and planned again when a parameter is replaced or moves) and one ``cat`` per run of one dtype.
    Nothing is kept but that plan: no reference to the parameters' memory. Sharded (DTensor) or non-contiguous
    parameters take the per-parameter path. Both give the same bytes.
    """
    params = list(model.parameters())
    key = tuple((id(p), p.data_ptr() if _plain(p) else None) for p in params)
    plan = _plans.get(model)
    if plan is None or plan[0] != key:
        plan = (key, _plan(params) if all(k[1] is not None for k in key) else None)
        _plans[model] = plan
    if plan[1] is None:
        samples = _samples(params)
    else:
        with torch.no_grad():
            samples = [torch.cat([torch.as_strided(params[i], (n,), (step,), params[i].storage_offset())
                                  for i, n, step in run]).to(torch.float32) for run in plan[1]]
    if not samples:
        return "empty"
    data = torch.cat([s.to(samples[0].device) for s in samples]).cpu()  # (8 x num_params,)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=8).hexdigest()


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (parameter key, runs or None)


def _plain(p: torch.Tensor) -> bool:
    """A parameter whose elements a strided view of its storage reaches: not a DTensor, not meta, contiguous."""
    return not hasattr(p, "to_local") and not p.is_meta and p.is_contiguous()


def _step(numel: int) -> int:
    return max(1, numel // SAMPLES_PER_PARAMETER)


def _plan(params: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """(parameter index, number of samples, step) per non-empty parameter, in runs of one dtype and device."""
    runs: list[list[tuple[int, int, int]]] = []
    last = None
    for i, p in enumerate(params):
        numel = p.numel()
        if numel == 0:
            continue
        step = _step(numel)
        entry = (i, min(SAMPLES_PER_PARAMETER, -(-numel // step)), step)  # what flat[::step][:8] takes
        if runs and last == (p.dtype, p.device):
            runs[-1].append(entry)
        else:
            runs.append([entry])
        last = (p.dtype, p.device)
    return runs


def _samples(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per parameter, its samples in float32 (the path for sharded or non-contiguous parameters)."""
    samples = []
    for p in params:
        t = p.detach()
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard (each rank compares its own)
            t = t.to_local()
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.reshape(-1)  # (N,)
        samples.append(flat[::_step(flat.numel())][:SAMPLES_PER_PARAMETER].to(torch.float32))
    return samples
