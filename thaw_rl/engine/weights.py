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

import torch

SAMPLES_PER_PARAMETER = 8


def weights_digest(model: torch.nn.Module) -> str:
    """Hex digest of 8 evenly spaced elements of every parameter (in ``named_parameters`` order)."""
    samples = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard (each rank compares its own)
            t = t.to_local()
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.reshape(-1)  # (N,) a view: parameters are contiguous
        step = max(1, flat.numel() // SAMPLES_PER_PARAMETER)
        samples.append(flat[::step][:SAMPLES_PER_PARAMETER].to(torch.float32))
    if not samples:
        return "empty"
    data = torch.cat([s.to(samples[0].device) for s in samples]).cpu()  # (8 x num_params,)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=8).hexdigest()
