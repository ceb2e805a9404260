"""Small filesystem helpers every stage shares: atomic directories and files, JSON metrics.

What they write gets the permissions a plain `open()` would give (files 0666, directories 0777, less the
umask), whichever library wrote it: safetensors writes its files 0600 (through a private temporary file),
which teammates on a shared disk could not read. `atomic_dir` sets them on everything in its directory
before the directory takes its place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block finishes.

    A killed or failing stage therefore leaves either the previous complete output or none, never a
    half-written directory that DVC or the next stage could take for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_like_open(tmp)
    if path.is_symlink():  # a multirun job's link to the workspace's copy: replace the link, not its target
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status, Linux 4.7+)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere only setting it returns it: set it back at once
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` creates a file with: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def share_like_open(root: Path) -> None:
    """Give `root` and everything under it the mode a plain open() / mkdir() would have created it with (files
    executable for someone keep their execute bits, less the umask); symbolic links are left alone."""
    mask = current_umask()
    for entry in (root, *root.rglob("*")):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            entry.chmod(0o777 & ~mask)
        elif entry.is_file():
            executable = entry.stat().st_mode & 0o111
            entry.chmod((0o777 if executable else 0o666) & ~mask)


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return json.loads(path.read_text())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (checkpoints can be gigabytes)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(d: dict, sep: str = ".", prefix: str = "") -> dict[str, int | float | str | bool | None]:
    """Nested dicts as one level, keys joined by `sep` (metrics tables for sweeps and W&B); scalars only."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, sep, f"{key}{sep}"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
