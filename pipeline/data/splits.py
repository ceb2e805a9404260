"""The prepared splits on disk (data/prepared): their files, the fields their readers need, and reading one back.

`load_split` refuses, naming `file:line` and the fix, a line that is not JSON, a row without a field its
readers need and an empty split; every stage that reads a split goes through it (the prepare stage writes
them: pipeline.data.prepare).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths

SPLIT_FILES: dict[str, str] = {
    "pretrain": "pretrain.jsonl",
    "pretrain_val": "pretrain_val.jsonl",
    "sft": "sft.jsonl",
    "preference": "preference.jsonl",
    "rl_prompts": "rl_prompts.jsonl",
    "eval": "eval.jsonl",
    "eval_hard": "eval_hard.jsonl",
}
# The fields each split's readers need (rows may carry more: generated rows record how they were made).
_PROBLEM = frozenset({"prompt", "answer", "family", "key"})
REQUIRED_FIELDS: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"text"}), "pretrain_val": frozenset({"text"}),
    "sft": frozenset({"messages", "family", "key", "answer"}),
    "preference": frozenset({"prompt", "chosen", "rejected", "corruption"}),
    "rl_prompts": _PROBLEM, "eval": _PROBLEM, "eval_hard": _PROBLEM,
}
TRAIN_SPLITS: tuple[str, ...] = ("sft", "preference", "rl_prompts")
EVAL_SPLITS: tuple[str, ...] = ("eval", "eval_hard")


def read_manifest(data_dir: Path = paths.PREPARED) -> dict:
    """data/prepared/manifest.json: what was generated or read, with counts and SHA-256 of every file."""
    path = Path(data_dir) / paths.MANIFEST.name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def cot_trigger(data_dir: Path = paths.PREPARED) -> str:
    """The chain-of-thought phrase the prepared SFT data was written with (evaluate asks the same way)."""
    return read_manifest(data_dir)["config"]["cot"]["trigger"]


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Read one split back as a list of row dicts (plain JSON Lines parsing; fast).

    Refuses, naming `file:line` and the fix, a line that is not JSON, a row without a field its readers
    need (REQUIRED_FIELDS) and an empty split."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first")
    required = REQUIRED_FIELDS[split]
    rows = []
    with path.open(encoding="utf-8") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno}): the file is "
                                     "damaged; rerun `dvc repro prepare`") from None
                if not isinstance(row, dict) or not row.keys() >= required:
                    missing = sorted(required - set(row)) if isinstance(row, dict) else sorted(required)
                    raise ValueError(f"{path}:{n}: missing field {missing[0]!r} (rows of {split} need "
                                     f"{', '.join(sorted(required))}): rerun `dvc repro prepare`")
                rows.append(row)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err}): the file is damaged; rerun "
                             "`dvc repro prepare`") from None
    if not rows:
        size, source = f"{split}_docs", ""
        if not split.startswith("pretrain"):
            size, source = split, f" (or fix data.sources.{split} if it reads the split from a hub or files)"
        raise ValueError(f"{path} has no rows: raise data.sizes.{size}{source}, then rerun `dvc repro prepare`")
    return rows
