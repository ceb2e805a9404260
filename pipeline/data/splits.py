"""The prepared splits on disk (data/prepared): their files, the fields their readers need, and reading one back.

`load_split` refuses, naming `file:line` and the fix, a line that is not UTF-8 or not JSON, a row that is not an
object, a row without a field its readers need or with a field of another type, an empty split, and a split with
fewer or more rows than the manifest says `prepare` wrote (a file cut short at a line end parses). Every stage
that reads a split goes through it (the prepare stage writes them: pipeline.data.prepare).

A byte order mark before the first row and CRLF line ends are read past: an editor may add either, `datasets`
(which reads the pretraining corpus) reads past both too, and the rows read are exactly the file's.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths
from pipeline.input_files import BOM, json_type, read_json, require_file

SPLIT_FILES: dict[str, str] = {
    "pretrain": "pretrain.jsonl",
    "pretrain_val": "pretrain_val.jsonl",
    "sft": "sft.jsonl",
    "preference": "preference.jsonl",
    "rl_prompts": "rl_prompts.jsonl",
    "eval": "eval.jsonl",
    "eval_hard": "eval_hard.jsonl",
}
# The fields each split's readers need, and their JSON types (rows may carry more: generated rows record how they
# were made).
_PROBLEM = {"prompt": str, "answer": str, "family": str, "key": str}
REQUIRED_FIELDS: dict[str, dict[str, type]] = {
    "pretrain": {"text": str}, "pretrain_val": {"text": str},
    "sft": {"messages": list, "family": str, "key": str, "answer": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str, "corruption": str},
    "rl_prompts": _PROBLEM, "eval": _PROBLEM, "eval_hard": _PROBLEM,
}
TRAIN_SPLITS: tuple[str, ...] = ("sft", "preference", "rl_prompts")
EVAL_SPLITS: tuple[str, ...] = ("eval", "eval_hard")
RERUN = "rerun `dvc repro prepare`"


def read_manifest(data_dir: Path = paths.PREPARED) -> dict:
    """data/prepared/manifest.json: what was generated or read, with counts and SHA-256 of every file."""
    path = Path(data_dir) / paths.MANIFEST.name
    return read_json(path, RERUN, missing=f"{path} not found: run the prepare stage first (dvc repro prepare)")


def cot_trigger(data_dir: Path = paths.PREPARED) -> str:
    """The chain-of-thought phrase the prepared SFT data was written with (evaluate asks the same way)."""
    trigger = read_manifest(data_dir).get("config")
    for key in ("cot", "trigger"):
        trigger = trigger.get(key) if isinstance(trigger, dict) else None
    if not isinstance(trigger, str):
        raise ValueError(f"{Path(data_dir) / paths.MANIFEST.name} lacks config.cot.trigger (a string): it is not the "
                         f"manifest the prepare stage writes; {RERUN}")
    return trigger


def _row_problem(row: object, fields: dict[str, type]) -> str | None:
    if not isinstance(row, dict):
        return f"the row is {json_type(row)}, not an object"
    missing = sorted(set(fields) - set(row))
    if missing:
        return f"missing field {missing[0]!r}"
    for field, kind in fields.items():
        if not isinstance(row[field], kind):
            return f"field {field!r} is {json_type(row[field])}, not {json_type(kind())}"
    return None


def _check_count(data_dir: Path, split: str, path: Path, n: int) -> None:
    """The manifest's row count of `split` (when there is a manifest: splits written by hand have none)."""
    manifest = Path(data_dir) / paths.MANIFEST.name
    if not manifest.exists() and not manifest.is_symlink():
        return
    counts = read_manifest(data_dir).get("counts")
    expected = counts.get(split) if isinstance(counts, dict) else None
    if not isinstance(expected, int):
        raise ValueError(f"{manifest} has no row count of {split} (counts.{split}): it is not the manifest the "
                         f"prepare stage writes; {RERUN}")
    if n != expected:
        raise ValueError(f"{path} has {n} rows, but {manifest} says the prepare stage wrote {expected}: the file was "
                         f"cut short or edited; {RERUN}")


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Read one split back as a list of row dicts (plain JSON Lines parsing; fast).

    Refuses, naming `file:line` and the fix, what the module docstring lists."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    require_file(path, RERUN, missing=f"{path} not found: run the prepare stage first")
    fields = REQUIRED_FIELDS[split]
    rows = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}): "
                                 f"the file is damaged; {RERUN}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno}): the file is "
                                 f"damaged; {RERUN}") from None
            problem = _row_problem(row, fields)
            if problem:
                raise ValueError(f"{path}:{n}: {problem} (rows of {split} need {', '.join(sorted(fields))}): "
                                 f"{RERUN}")
            rows.append(row)
    if not rows:
        size, source = f"{split}_docs", ""
        if not split.startswith("pretrain"):
            size, source = split, f" (or fix data.sources.{split} if it reads the split from a hub or files)"
        raise ValueError(f"{path} has no rows: raise data.sizes.{size}{source}, then rerun `dvc repro prepare`")
    _check_count(data_dir, split, path, len(rows))
    return rows
