"""Triton kernels for paged KV caches, their torch references, and pinned asynchronous host copies.

Each kernel ``X_triton`` has a torch reference ``X_reference`` with the same signature, and ``X``
dispatches between them (Triton for CUDA tensors, the reference elsewhere).
"""

from thaw_rl_kernels.block_copy import (
    copy_blocks,
    copy_blocks_reference,
    copy_blocks_triton,
    gather_blocks,
    gather_blocks_reference,
    gather_blocks_triton,
    scatter_blocks,
    scatter_blocks_reference,
    scatter_blocks_triton,
)
from thaw_rl_kernels.host_transfer import KVTransfer, PinnedBufferPool, TransferHandle
from thaw_rl_kernels.kv_write import write_kv, write_kv_reference, write_kv_triton

# paged attention: see paged_attention.py; cascade (shared-prefix) decode attention: cascade_attention.py

__all__ = [
    "copy_blocks",
    "copy_blocks_reference",
    "copy_blocks_triton",
    "gather_blocks",
    "gather_blocks_reference",
    "gather_blocks_triton",
    "scatter_blocks",
    "scatter_blocks_reference",
    "scatter_blocks_triton",
    "KVTransfer",
    "PinnedBufferPool",
    "TransferHandle",
    "write_kv",
    "write_kv_reference",
    "write_kv_triton",
]
