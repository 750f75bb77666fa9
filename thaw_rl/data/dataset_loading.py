"""Load a recipe's datasets through ``datasets``: built-in tasks, local files, or hub names.

``dataset_name`` is one of

- ``builtin:<task>`` (see ``builtin_tasks``): rows generated in code, no hub needed;
- a local file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.arrow``) or a directory (written by
  ``save_to_disk``, or holding data files);
- a hub dataset name (``openai/gsm8k``), for users with hub access.

Rows are brought to the shape TRL's trainers and the built-in rewards read: a ``prompt`` column (chat
messages when it was built here) and an ``answer`` column. A recipe whose questions live in another
column names it (``dataset_prompt_column: question``), and the prompt becomes
``[system_prompt?, {"role": "user", "content": question}]``; ``dataset_answer_column`` is copied to
``answer``. Anything missing (a file, a split, a column, the hub) raises ``ValueError`` that names
what exists; an empty file, or a JSON-lines file with a line that is not one JSON object, names the file
and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from thaw_rl.data.builtin_tasks import builtin_choices, builtin_rows, is_builtin

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a recipe's rows come from and how they become prompts (the recipe's ``dataset_*`` keys)."""

    name: str
    config: str | None = None
    train_split: str = "train"
    test_split: str | None = None
    num_examples: int | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system_prompt: str | None = None
    seed: int = 0


def load_recipe_datasets(spec: DatasetSpec):
    """(train_dataset, eval_dataset or None) as ``datasets.Dataset``."""
    from datasets import Dataset

    if is_builtin(spec.name):
        train = Dataset.from_dict(builtin_rows(spec.name, spec.num_examples, spec.seed, spec.config,
                                               spec.system_prompt))
        test = None
        if spec.test_split:
            test = Dataset.from_dict(builtin_rows(spec.name, spec.num_examples, spec.seed, spec.config,
                                                  spec.system_prompt, eval_split=True))
        return train, test
    splits = _load_splits(spec)
    train = _split(splits, spec.train_split, spec)
    test = _split(splits, spec.test_split, spec) if spec.test_split else None
    return _to_prompts(train, spec), (_to_prompts(test, spec) if test is not None else None)


def _choices() -> str:
    return (f"a built-in task ({builtin_choices()}), a local file ({', '.join(sorted(FILE_BUILDERS))}) or "
            f"directory, or a hub dataset name (needs hub access)")


def _load_splits(spec: DatasetSpec):
    """A ``DatasetDict`` (or something indexable by split name) for a local path or hub name."""
    import datasets

    path = Path(spec.name).expanduser()
    suffix = path.suffix.lower()
    looks_local = suffix in FILE_BUILDERS or spec.name.startswith((".", "/", "~")) or os.sep in spec.name.strip("/")
    if path.is_file():
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"dataset_name={spec.name!r}: unknown file type {suffix!r}; use "
                             f"{', '.join(sorted(FILE_BUILDERS))}.")
        check_local_file(path)
        try:
            return datasets.load_dataset(FILE_BUILDERS[suffix], data_files={spec.train_split: str(path)})
        except Exception as err:  # datasets wraps parse errors in DatasetGenerationError and others
            cause = err.__cause__ or err
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ValueError(f"dataset_name={spec.name!r}: {path} could not be read as {suffix} "
                             f"({type(cause).__name__}: {first}). Fix the file.") from None
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else {spec.train_split: loaded}
        return datasets.load_dataset(str(path), spec.config)
    if suffix in FILE_BUILDERS or (looks_local and spec.name.count("/") != 1):
        raise ValueError(f"dataset_name={spec.name!r}: no such file or directory. Use {_choices()}.")
    try:
        return datasets.load_dataset(spec.name, spec.config)
    except Exception as err:  # offline, unknown name, bad config: datasets raises many types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
        raise ValueError(f"dataset_name={spec.name!r} (dataset_config={spec.config!r}) could not be loaded from "
                         f"the hub{offline}: {type(err).__name__}: {first_line}. Use {_choices()}.") from None


def check_local_file(path: Path) -> None:
    """An empty data file, or a JSON-lines file with a bad line: a ``ValueError`` naming the file and line."""
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise ValueError(f"dataset file {path} is empty: it holds no rows.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            json.loads(path.read_text())
            return  # one JSON document (a list of rows, or {column: [...]}): datasets reads it
        except json.JSONDecodeError:
            pass  # maybe JSON lines, which datasets also reads from .json: check it as such
    if suffix in (".json", ".jsonl"):
        _check_json_lines(path)


def _check_json_lines(path: Path) -> None:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"dataset file {path}, line {number}: not valid JSON ({err.msg} at column "
                                 f"{err.colno}): {line[:80]!r}. Each line must be one JSON object, e.g. "
                                 f'{{"prompt": "...", "answer": "..."}}.') from None
            if not isinstance(row, dict):
                raise ValueError(f"dataset file {path}, line {number}: a JSON {type(row).__name__}, not an object; "
                                 f'each line must be one row, e.g. {{"prompt": "...", "answer": "..."}}.')


def _split(splits, name: str, spec: DatasetSpec):
    available = list(splits.keys())
    if name not in available:
        raise ValueError(f"dataset_name={spec.name!r} has no split {name!r}: it has {available}. Set "
                         f"dataset_train_split / dataset_test_split to one of these.")
    return splits[name]


def _to_prompts(dataset, spec: DatasetSpec):
    """Add the ``prompt`` (and ``answer``) columns the trainers and rewards read, and cap the rows."""
    columns = dataset.column_names
    if spec.prompt_column not in columns:
        raise ValueError(f"dataset_name={spec.name!r} has no column {spec.prompt_column!r} "
                         f"(dataset_prompt_column): its columns are {columns}.")
    if spec.answer_column != "answer" and spec.answer_column not in columns:
        raise ValueError(f"dataset_name={spec.name!r} has no column {spec.answer_column!r} "
                         f"(dataset_answer_column): its columns are {columns}.")
    if len(dataset) == 0:
        raise ValueError(f"dataset_name={spec.name!r} has no rows.")
    if spec.num_examples is not None:
        dataset = dataset.select(range(min(spec.num_examples, len(dataset))))
    needs_chat = spec.prompt_column != "prompt" or spec.system_prompt is not None
    copy_answer = spec.answer_column != "answer" and spec.answer_column in columns

    def convert(row):
        out = {}
        if needs_chat:
            out["prompt"] = _chat(row[spec.prompt_column], spec.system_prompt)
        if copy_answer:
            out["answer"] = str(row[spec.answer_column])
        return out

    if needs_chat or copy_answer:
        dataset = dataset.map(convert)
    return dataset


def _chat(content, system_prompt: str | None) -> list[dict[str, str]]:
    if isinstance(content, list):  # already messages
        messages = list(content)
    else:
        messages = [{"role": "user", "content": str(content)}]
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
