"""A stage that is refused, fails or is interrupted leaves the workspace's previous outputs as they were.

Two ways a stage's earlier outputs could be lost, and what undoes each:

- `dvc repro` and `dvc exp run` delete a stage's outputs before they start its command (DVC's contract:
  a command writes its outputs anew), and every check of config and inputs runs inside that command. So
  when the stage started under DVC (DVC_STAGE names it) and does not finish, each declared output that
  was missing at the start is put back as dvc.lock records it, from DVC's cache: the run cache keeps even
  the outputs kept in git (metrics, DVCLive's files) there, by the hash dvc.lock holds.
- Run any other way (`python -m stages.<name>`, a multirun job, the tests), the outputs are still there
  when the stage starts, and stay there while it runs (a continued run reads its own DVCLive files): a
  snapshot is taken under outputs/previous/<stage>/ before the checks and put back if the stage does not
  finish. The snapshot links the files of the directories the pipeline only ever replaces whole
  (checkpoints, the splits, the tokenizer and its shards, the export: `pipeline.io.atomic_dir` writes a new
  directory and renames it into place, so a link keeps the old bytes), costing no copy of a checkpoint; the
  rest (metrics, DVCLive's files, which grow in place) is copied.

Either way the partial outputs of the failed run are removed first; the resume checkpoints
(outputs/resume/<stage>/) are not outputs and are never touched, so the rerun resumes. After a SIGKILL
nothing can run: `dvc repro` reruns (and resumes) the stage, `dvc checkout <stage>` restores its last
committed outputs.

Why not DVC's `persist: true`, which keeps outputs in place? DVC's run cache skips every stage with a
persistent output, so `dvc exp run` would retrain stages it now restores. Why by hand: DVC offers no
checkout from inside a stage's command (the running `dvc repro` holds the lock on these very outputs);
this module reads dvc.lock and the cache's files (a directory is a JSON list of its files' hashes) and
copies them, using DVC only to find where its cache is.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline import paths

log = logging.getLogger(__name__)

LOCK_FILE = Path("dvc.lock")


def _exists(path: Path) -> bool:
    return os.path.lexists(path)  # a multirun job's outputs may be links to the workspace's


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def under_dvc(stage: str) -> bool:
    """Whether this process is the command `dvc repro` / `dvc exp run` runs for `stage`."""
    return os.environ.get("DVC_STAGE") == stage


def _snapshot(path: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # a multirun job's link to the workspace's output: the link is what is put back
        os.symlink(os.readlink(path), target)
    elif path.is_dir():
        shutil.copytree(path, target, symlinks=True, copy_function=os.link if link else shutil.copy2)
    else:
        shutil.copy2(path, target)


@contextmanager
def kept_on_failure(stage: str, replaced: list[Path], rewritten: list[Path]) -> Iterator[None]:
    """Run the block; if it does not finish (an error, a refusal, Ctrl-C, SIGTERM), remove what it wrote of its
    outputs and put the previous ones back. `replaced`: outputs only ever replaced whole (their files are linked
    into the snapshot); `rewritten`: the others (copied)."""
    aside = paths.OUTPUTS / "previous" / stage
    shutil.rmtree(aside, ignore_errors=True)  # one left by a run that was killed: what is in place now is newer
    outputs = [*replaced, *rewritten]
    present = [p for p in outputs if _exists(p)]
    for p in present:
        _snapshot(p, aside / p, link=p in replaced)
    missing = [p for p in outputs if p not in present]
    try:
        yield
    except BaseException:
        for p in outputs:
            _remove(p)
        for p in present:
            os.replace(aside / p, p)
        restored = restore_from_lock(stage, missing) if missing and under_dvc(stage) else []
        shutil.rmtree(aside, ignore_errors=True)
        if present or restored:
            log.info("%s: its previous outputs are in place (%s)", stage,
                     ", ".join(str(p) for p in [*present, *restored]))
        raise
    shutil.rmtree(aside, ignore_errors=True)


def restore_from_lock(stage: str, wanted: list[Path]) -> list[Path]:
    """Put back each of `wanted` as dvc.lock records it for `stage`, from DVC's cache; the ones restored."""
    try:
        lock = yaml.safe_load(LOCK_FILE.read_text()) if LOCK_FILE.is_file() else None
        entries = {Path(o["path"]): o for o in ((lock or {}).get("stages", {}).get(stage) or {}).get("outs", [])}
    except (OSError, yaml.YAMLError, AttributeError, TypeError, KeyError) as err:
        log.warning("%s: dvc.lock is unreadable (%s): `dvc checkout %s` restores its outputs", stage, err, stage)
        return []
    cache = _cache_dir()
    restored = []
    for path in wanted:
        entry = entries.get(path)
        if entry is None or entry.get("hash", "md5") != "md5" or "md5" not in entry:
            continue
        try:
            _restore(cache, str(entry["md5"]), path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            _remove(path)
            log.warning("%s: %s could not be restored from DVC's cache (%s): run `dvc checkout %s`", stage,
                        path, err, stage)
            continue
        restored.append(path)
    return restored


def _cache_dir() -> Path:
    """Where DVC keeps this repo's files by hash (its config may move it; `dvc exp run --temp` shares one)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return Path(repo.cache.local.path)


def _object(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def _restore(cache: Path, md5: str, path: Path) -> None:
    """Copy object `md5` (a file, or a directory when it ends in .dir) from `cache` to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    if md5.endswith(".dir"):
        tmp.mkdir()
        for item in json.loads(_object(cache, md5).read_text()):
            target = tmp / item["relpath"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_object(cache, item["md5"]), target)
    else:
        shutil.copyfile(_object(cache, md5), tmp)
    os.replace(tmp, path)
