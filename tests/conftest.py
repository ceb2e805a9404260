"""Shared fixtures: configs composed from the real conf/ and shrunk, and one trained micro chain.

The micro chain runs every stage once per test session, in-process, inside a temporary working
directory (artifact paths are repo-relative, so a chdir isolates it from the repo's own outputs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def compose_micro(*overrides: str):
    from pipeline.config import compose
    return compose(["experiment=micro", *overrides])


@pytest.fixture
def micro_cfg():
    return compose_micro()


@pytest.fixture(scope="session")
def micro_chain(tmp_path_factory) -> Path:
    """A directory where the whole micro lifecycle has run (logger off); returns it."""
    from pipeline.runner import run_stage

    work = tmp_path_factory.mktemp("chain")
    cfg = compose_micro()
    old = Path.cwd()
    os.chdir(work)
    try:
        run_stage("all", cfg)
    finally:
        os.chdir(old)
    return work


@pytest.fixture
def in_chain(micro_chain, monkeypatch) -> Path:
    monkeypatch.chdir(micro_chain)
    return micro_chain


def repo_copy(dest: Path) -> Path:
    """Copy the repo's tracked and untracked-but-not-ignored files into `dest` as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def venv_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the running interpreter's bin dir first on PATH (dvc, python)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}
