"""KVSnapshot: a session's KV in host memory, plus what a restore needs to check and rebuild it.

Why: a trunk (a prompt plus a partial answer) is computed once in one engine and continued in others
(ForkPool workers on other devices, or a later process). A snapshot carries the trunk's tokens, the KV
of the blocks that hold its computed tokens, the next-token logits when they are known, the chained
block hashes, the fingerprint of the engine that computed it (architecture, sizes, dtype, block
size), and the weights it was computed with (the engine's ``weight_version`` and a digest sampled from
the weights). ``ThawEngine.restore`` compares the fingerprint field by field and the weights, shares the
blocks the target's prefix cache already holds, scatters the rest into fresh blocks in one launch, and
registers their hashes, so a later ``prefill`` of the same prompt in the target engine finds them.

This module is the data and its file format only; taking and restoring snapshots (the copy stream,
the pooled pinned host buffers, the block bookkeeping) is the engine's (``ThawEngine.snapshot_async``).

File format (``save``/``load``), little-endian::

    0   magic   8 bytes  b"\\x89THAWKV\\n"
    8   version u32      FORMAT_VERSION
    12  json    u64      length of the JSON metadata
    20  payload u64      length of the tensor bytes
    28  blake2b-16 of bytes [0, 28)  (so a damaged length field reads as corruption, not truncation)
    44  JSON metadata (fingerprint, token ids, lengths, block hashes as hex, dtypes and shapes, weight
        version and weights digest)
    ..  payload: kv bytes, then next_logits bytes (if any), raw (bfloat16 round-trips exactly)
    ..  blake2b-32 of every byte before it

Bytes are checked before anything is parsed, so a damaged file is never restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import weakref
from dataclasses import dataclass, field

import torch

from thaw_rl_kernels.kv_write import FP8_DTYPE

MAGIC = b"\x89THAWKV\n"  # high bit catches 7-bit transfers, the newline catches text-mode rewrites
FORMAT_VERSION = 2  # 2: the weight version and the weights digest (snapshots of format 1 carry neither)
_FIXED = struct.Struct("<8sIQQ")  # magic, version, json length, payload length
_HEADER_DIGEST_SIZE = 16
_HEADER_SIZE = _FIXED.size + _HEADER_DIGEST_SIZE  # 44
_DIGEST_SIZE = 32
FP8_NAME = str(FP8_DTYPE).removeprefix("torch.")  # "float8_e4m3fn": a fingerprint's dtype of an FP8 cache
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, FP8_NAME: FP8_DTYPE}

# What a restore's advice says for each fingerprint field that differs.
_FIXES = {
    "dtype": "restore into an engine built on the same model in {snapshot} (model.to(torch.{snapshot}))",
    # the fingerprint's dtype is the KV cache's: an FP8 cache (ThawEngine(kv_cache_dtype="fp8")) on either side
    "kv_fp8": "restore into an engine whose KV cache holds {snapshot}: ThawEngine(..., kv_cache_dtype={wanted})",
    "block_size": "build the target engine with ThawEngine(..., block_size={snapshot})",
}
_OTHER_MODEL_FIX = "the snapshot comes from another model; restore into an engine built on the same model"


class SnapshotMismatchError(ValueError):
    """The snapshot was computed by an engine whose fingerprint differs from the target's."""

    def __init__(self, message: str, field: str, snapshot_value, engine_value) -> None:
        super().__init__(message)
        self.field = field
        self.snapshot_value = snapshot_value
        self.engine_value = engine_value


class SnapshotFileError(ValueError):
    """A file that cannot be read back as a snapshot (the subclasses say why)."""


class NotASnapshotFileError(SnapshotFileError):
    """The file does not start with the snapshot magic."""


class SnapshotTruncatedError(SnapshotFileError):
    """The file is shorter than its header says."""


class SnapshotCorruptedError(SnapshotFileError):
    """A checksum does not match: the bytes changed after ``save`` wrote them."""


@dataclass(eq=False)
class KVSnapshot:
    """One session's tokens and KV, in host memory, restorable into any engine with the same fingerprint.

    ``kv[i]`` is block i of the session (tokens ``i*BS .. (i+1)*BS``) for every layer; slots at or past
    ``num_computed`` hold no meaning. ``block_hashes`` are the chained hashes of the full computed
    blocks (SHA-256 based, equal across processes). A snapshot from ``ThawEngine.snapshot`` lives in a
    pooled host buffer that goes back to the pool when ``kv`` is garbage collected or on ``release()``:
    keep the snapshot (or its ``kv``) alive while you use it, and ``clone()`` data you keep longer. With
    ``snapshot(session, out=...)`` ``kv`` is the caller's ``out`` (host or device memory) and stays theirs.
    """

    fingerprint: dict[str, str | int]
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int
    block_hashes: list[bytes]
    kv: torch.Tensor  # (n_blocks, L, 2, BS, KVH, D) host
    next_logits: torch.Tensor | None = None  # (V,) float32 host, known right after a prefill
    weight_version: int = 0  # the engine's weight version when the KV was computed
    weights_digest: str | None = None  # a sample of the weights' bytes (None: unknown, not checked)
    _release: weakref.finalize | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        self.block_hashes = [bytes(h) for h in self.block_hashes]
        _check_consistent(self)

    def __getstate__(self) -> dict:
        """Pickle (ForkPool transport) a compact copy: not the pooled buffer, not its finalizer."""
        self._check_usable()
        state = dict(vars(self))
        state["kv"] = self.kv.clone() if self._release is not None else self.kv
        state["_release"] = None
        return state

    def __repr__(self) -> str:
        fp = self.fingerprint
        return (f"KVSnapshot({fp.get('architecture')} {fp.get('dtype')}, {self.num_computed}/{self.num_tokens} tokens "
                f"computed, {self.num_blocks} blocks, {self.nbytes / 2**20:.2f} MiB)")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (KV plus next-token logits)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def release(self) -> None:
        """Give a pooled host buffer back now instead of at garbage collection; the snapshot is unusable after."""
        if self._release is not None:
            self._release()
        self._released = True

    # -- file ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one self-checking file (see the module docstring); replaces ``path`` atomically."""
        self._check_usable()
        arrays = [t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy() for t in self._tensors()]
        meta = json.dumps(self._metadata(), sort_keys=True, separators=(",", ":")).encode()
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, len(meta), sum(a.nbytes for a in arrays))
        header = fixed + hashlib.blake2b(fixed, digest_size=_HEADER_DIGEST_SIZE).digest()
        digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        _check_save_target(path)
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        f = open(tmp, "xb")  # x: never through a link or special file found at tmp, and never removing one
        try:
            with f:
                for chunk in (header, meta, *arrays):
                    digest.update(chunk)
                    f.write(chunk)
                f.write(digest.digest())
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, pin_memory: bool = False) -> KVSnapshot:
        """Read a file written by ``save``; every byte is checked before anything is parsed."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = f.read(_HEADER_SIZE)
            meta_len, payload_len = _check_header(path, header, size)
            digest = hashlib.blake2b(header, digest_size=_DIGEST_SIZE)
            meta_bytes = f.read(meta_len)
            digest.update(meta_bytes)
            payload = torch.empty(payload_len, dtype=torch.uint8, pin_memory=pin_memory)  # (P,)
            if f.readinto(payload.numpy()) != payload_len:
                raise SnapshotTruncatedError(f"{path} is truncated: it shrank while being read.")
            digest.update(payload.numpy())
            stored = f.read(_DIGEST_SIZE)
        if stored != digest.digest():
            raise SnapshotCorruptedError(
                f"{path}: file is corrupted: checksum mismatch (blake2b of the contents is "
                f"{digest.hexdigest()[:16]}..., "
                f"the file records {stored.hex()[:16]}...). It changed after KVSnapshot.save wrote it; nothing was "
                f"restored. Take and save the snapshot again."
            )
        return cls._from_metadata(path, meta_bytes, payload)

    # -- helpers ---------------------------------------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        return [self.kv] + ([self.next_logits] if self.next_logits is not None else [])

    def _check_usable(self) -> None:
        if self._released:
            raise ValueError("this KVSnapshot was released (its host buffer went back to the pool); take it again.")

    def _metadata(self) -> dict:
        def desc(t):
            return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

        return {
            "fingerprint": self.fingerprint, "token_ids": self.token_ids,
            "num_prompt_tokens": self.num_prompt_tokens, "num_computed": self.num_computed,
            "block_hashes": [h.hex() for h in self.block_hashes], "kv": desc(self.kv),
            "next_logits": desc(self.next_logits) if self.next_logits is not None else None,
            "weight_version": self.weight_version, "weights_digest": self.weights_digest,
        }

    @classmethod
    def _from_metadata(cls, path, meta_bytes: bytes, payload: torch.Tensor) -> KVSnapshot:
        """Rebuild from checksummed bytes; a failure here means a writer bug, not damage."""
        try:
            meta = json.loads(meta_bytes)
            descs = [meta["kv"]] + ([meta["next_logits"]] if meta["next_logits"] is not None else [])
            tensors, offset = [], 0
            for d in descs:
                dtype = _DTYPES[d["dtype"]]
                numel = 1
                for n in d["shape"]:
                    numel *= int(n)
                nbytes = numel * dtype.itemsize
                tensors.append(payload[offset:offset + nbytes].view(dtype).view(*d["shape"]))
                offset += nbytes
            if offset != payload.numel():
                raise ValueError(f"the tensors take {offset} bytes but the payload has {payload.numel()}")
            return cls(
                fingerprint=meta["fingerprint"], token_ids=meta["token_ids"],
                num_prompt_tokens=meta["num_prompt_tokens"], num_computed=meta["num_computed"],
                block_hashes=[bytes.fromhex(h) for h in meta["block_hashes"]], kv=tensors[0],
                next_logits=tensors[1] if len(tensors) > 1 else None,
                weight_version=meta["weight_version"], weights_digest=meta["weights_digest"],
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SnapshotFileError(
                f"{path} passed its checksum but its metadata is not a valid snapshot ({type(e).__name__}: {e}); "
                f"it was written by another version of thaw-rl (format {FORMAT_VERSION} here)."
            ) from e


def check_fingerprint(snapshot_fp: dict, engine_fp: dict) -> None:
    """Raise SnapshotMismatchError naming the first field that differs, both values, and the fix."""
    for name in list(engine_fp) + [k for k in snapshot_fp if k not in engine_fp]:
        theirs, ours = snapshot_fp.get(name), engine_fp.get(name)
        if theirs != ours:
            advice = "kv_fp8" if name == "dtype" and FP8_NAME in (theirs, ours) else name
            fix = _FIXES.get(advice, _OTHER_MODEL_FIX).format(
                snapshot=theirs, engine=ours, wanted="'fp8'" if theirs == FP8_NAME else "'auto'")
            raise SnapshotMismatchError(
                f"snapshot {name} {theirs} != engine {name} {ours}: {fix}.", name, theirs, ours
            )


# -- helpers ---------------------------------------------------------------------------------------
def _check_consistent(s: KVSnapshot) -> None:
    """Misuse checks for a hand-built or loaded snapshot: every field must agree with the fingerprint."""
    fp = s.fingerprint
    needed = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "vocab_size")
    missing = [k for k in needed if k not in fp]
    if missing:
        raise ValueError(f"snapshot fingerprint lacks {missing}; use ThawEngine.fingerprint.")
    bs = int(fp["block_size"])
    if not 0 <= s.num_computed <= s.num_tokens or not 1 <= s.num_prompt_tokens <= s.num_tokens:
        raise ValueError(
            f"snapshot has {s.num_tokens} tokens, num_prompt_tokens={s.num_prompt_tokens} and "
            f"num_computed={s.num_computed}; need 1 <= num_prompt_tokens <= num_tokens and num_computed <= num_tokens."
        )
    if len(s.block_hashes) != s.num_computed // bs:
        raise ValueError(f"snapshot has {len(s.block_hashes)} block hashes for {s.num_computed // bs} full blocks.")
    bad = [t for t in s.token_ids if not 0 <= t < int(fp["vocab_size"])]
    if bad:
        raise ValueError(f"snapshot token ids {bad[:5]} are outside the vocabulary [0, {fp['vocab_size']}).")
    shape = (-(-s.num_computed // bs), fp["num_layers"], 2, bs, fp["num_kv_heads"], fp["head_dim"])
    if not isinstance(s.kv, torch.Tensor) or tuple(s.kv.shape) != shape or _dtype_name(s.kv.dtype) != fp["dtype"]:
        got = (tuple(s.kv.shape), s.kv.dtype) if isinstance(s.kv, torch.Tensor) else type(s.kv).__name__
        raise ValueError(f"snapshot kv must be {shape} {fp['dtype']} (n_blocks, L, 2, BS, KVH, D); got {got}.")
    if s.next_logits is not None:
        if tuple(s.next_logits.shape) != (int(fp["vocab_size"]),) or s.next_logits.dtype != torch.float32:
            raise ValueError(f"next_logits must be ({fp['vocab_size']},) float32; got {tuple(s.next_logits.shape)}.")
        if s.num_computed != s.num_tokens:
            raise ValueError("next_logits predict the token after the last one: they need num_computed == num_tokens.")


def _check_save_target(path: str | os.PathLike) -> None:
    """``save`` writes a regular file: a new path, or an existing regular file that it replaces.

    ``os.replace`` onto a symlink, FIFO or device would swap that node for our file (as root it replaced
    /dev/full), and a symlink's target would silently stay as it was; so anything else is refused.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise ValueError(f"KVSnapshot.save({os.fspath(path)!r}): the path is {kind}; save writes a regular file and "
                     f"would replace it. Give a new path or an existing regular file (for a link, its target: "
                     f"os.path.realpath(path)).")


def _check_header(path, header: bytes, size: int) -> tuple[int, int]:
    """(json length, payload length) from the fixed header, or the error that says what is wrong."""
    if header[:len(MAGIC)] != MAGIC:
        raise NotASnapshotFileError(
            f"{path} is not a thaw-rl KV snapshot: it starts with {header[:len(MAGIC)]!r}, not {MAGIC!r}. "
            f"Write snapshots with KVSnapshot.save."
        )
    if len(header) < _HEADER_SIZE:
        raise SnapshotTruncatedError(f"{path} is truncated: expected at least {_HEADER_SIZE} bytes, found {size}.")
    fixed = header[:_FIXED.size]
    if hashlib.blake2b(fixed, digest_size=_HEADER_DIGEST_SIZE).digest() != header[_FIXED.size:]:
        raise SnapshotCorruptedError(
            f"{path}: file is corrupted: checksum of the {_FIXED.size}-byte header does not match; nothing was "
            f"restored. Take and save the snapshot again."
        )
    _, version, meta_len, payload_len = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        why = " (format 1 does not record the weight version its KV was computed with)" if version == 1 else ""
        raise SnapshotFileError(
            f"{path} is snapshot format version {version}; this thaw-rl reads version {FORMAT_VERSION}{why}. "
            f"Load it with the thaw-rl that wrote it, or take the snapshot again."
        )
    expected = _HEADER_SIZE + meta_len + payload_len + _DIGEST_SIZE
    if size < expected:
        raise SnapshotTruncatedError(
            f"{path} is truncated: expected {expected} bytes, found {size}. It was cut short (an interrupted "
            f"copy or a full disk); nothing was restored."
        )
    if size > expected:
        raise SnapshotCorruptedError(
            f"{path}: file is corrupted: {size - expected} bytes past the end of the snapshot ({expected} bytes)."
        )
    return meta_len, payload_len


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
