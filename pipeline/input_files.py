"""Opening the files a stage reads (what earlier stages, or the user, wrote), with refusals that name the file, the
line where there is one, and the fix.

`require_file` tells a missing file from what only looks like one: a symbolic link that resolves to nothing (a
loop, or a target that is gone), a directory in its place. `read_json` reads one JSON document (a checkpoint's
meta.json, a token shard index, the prepared manifest, a transformers config.json): an empty file, bytes that are
not UTF-8, a byte order mark, text that is not JSON (by line and column) and a value of another JSON type are each
refused by name. `broken_links` lists the links under an input directory that resolve to nothing: a reader of one
file there never opens them, but DVC and the W&B lineage walk the directory whole.

Design choices: a byte order mark in a JSON document is refused, not skipped: no writer of these files adds one
and their other readers (the `tokenizers` parser, transformers) refuse it too, so skipping it here would only move
the failure later. CRLF line ends are JSON whitespace and read as every JSON parser reads them. (The prepared
JSON Lines splits, which `datasets` reads too, accept both: pipeline.data.splits.)
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


def json_type(value: Any) -> str:
    """What JSON calls `value`'s type, with its article (for messages)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "null")


def _link_problem(path: Path) -> str | None:
    """Why the symbolic link `path` leads nowhere, or None when it is no link or resolves."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop ({path} -> {os.readlink(path)})"
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def require_file(path: Path, fix: str, missing: str | None = None) -> None:
    """Refuse `path` unless it is a regular file (or a link to one): a missing file raises FileNotFoundError
    (`missing`, else "`path` not found: `fix`"), anything else in its place ValueError, each with `fix`."""
    path = Path(path)
    if path.is_file():
        return
    for link in (path, *path.parents):
        problem = _link_problem(link)
        if problem:
            raise ValueError(f"{problem}: {path} cannot be read; replace the link with the file ({fix})")
    if path.exists():
        raise ValueError(f"{path} is a directory, not a file: {fix}")
    raise FileNotFoundError(missing or f"{path} not found: {fix}")


def position(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column), both from 1, of byte `offset` of `data`."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def json_problem(data: bytes) -> tuple[str, Any]:
    """(what is wrong with `data` as one JSON document, "" if nothing; the value it holds, None if it is damaged)."""
    if not data.strip():
        return "it is empty", None
    if data.startswith(BOM):
        return "it starts with a byte order mark (U+FEFF), which JSON files the pipeline reads never carry", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = position(data, err.start)
        return f"line {line} column {column}: byte 0x{data[err.start]:02x} is not UTF-8 text", None
    try:
        return "", json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno} column {err.colno}: not valid JSON: {err.msg}", None


def read_json(path: Path, fix: str, expect: type = dict, missing: str | None = None,
              damaged: str = "is damaged") -> Any:
    """The JSON value in `path`, which must be of type `expect`; refused (ValueError naming the file, the line and
    column where there is one, and `fix`) if it is not. `missing`: the message when there is no such file."""
    path = Path(path)
    require_file(path, fix, missing)
    problem, value = json_problem(path.read_bytes())
    if problem:
        raise ValueError(f"{path} {damaged} ({problem}): {fix}")
    if not isinstance(value, expect):
        raise ValueError(f"{path} {damaged} (it holds {json_type(value)} where {json_type(expect())} belongs): {fix}")
    return value


def broken_links(root: Path) -> Iterator[str]:
    """Why each symbolic link at or under `root` leads nowhere (a loop, a missing target); links are not followed."""
    root = Path(root)
    problem = _link_problem(root)
    if problem:
        yield problem
        return
    if not root.is_dir():
        return
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            problem = _link_problem(Path(top) / name)
            if problem:
                yield problem


def check_links(roots: Iterable[Path]) -> None:
    """Refuse a symbolic link that leads nowhere at or under any of `roots` (a stage's input directories): the
    stage may never open it, but DVC hashes the directory whole and the W&B lineage walks it, after the work."""
    for root in roots:
        for problem in broken_links(root):
            raise ValueError(f"{problem}, under {root}, an input of this stage: remove the link or point it at a "
                             "file (or rerun the stage that writes the directory)")
