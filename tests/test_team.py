"""The team workflow with real DVC and git: a run pushed to the DVC remote and pulled into a fresh clone
instead of retrained, and experiments shared through a git remote.

Each test works on its own copy of the `micro_repo` fixture (the micro chain after `dvc repro`), with
the run committed as a teammate would commit it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, venv_env

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"}
STAGES = ("prepare", "tokenizer", "pretrain", "sft", "reward", "align", "sft_control", "export", "evaluate",
          "report")
NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-/_]*[a-zA-Z0-9])?")  # an artifact name or label for GTO (gto.constants.name)


def sh(cwd: Path, *cmd: str, **env: str) -> str:
    """Run a command (dvc, git) in `cwd`; fail the test with its output unless it succeeds."""
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(**GIT_IDENTITY, WANDB_MODE="offline", **env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def committed_copy(micro_repo: Path, dest: Path) -> Path:
    """A copy of the micro run (its DVC cache included, W&B files and DVC's temp dir not) with
    dvc.lock, metrics and report committed."""
    skip = {micro_repo / "wandb", micro_repo / ".dvc" / "tmp"}
    shutil.copytree(micro_repo, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "micro run")
    return dest


def declared_outs(repo: Path) -> list[str]:
    """Every `outs` path of dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]


def experiments(repo: Path) -> dict[str, dict]:
    """{experiment name: its `data` entry (params, metrics)} from `dvc exp show --json`."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    return {exp["name"]: exp["revs"][0]["data"] for baseline in shown for exp in (baseline.get("experiments") or [])
            if exp.get("name")}


def test_the_default_remote_is_per_user_and_the_registry_names_every_checkpoint():
    """The committed default remote lies under `~` (DVC expands it), so every clone of one user on a
    machine shares it; each `artifacts:` entry is a DVC-tracked output (pushed, pulled) with the fields
    and names DVC Studio and GTO accept."""
    from configobj import ConfigObj  # what DVC reads its config with

    conf = ConfigObj(str(REPO / ".dvc" / "config"))
    assert conf[f'remote "{conf["core"]["remote"]}"']["url"] == "~/.cache/gpt-pipeline/dvc-remote"
    registry = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    assert {a["path"] for a in registry.values()} == {f"artifacts/{d}" for d in (
        "tokenizer", "pretrain", "sft", "reward", "aligned", "sft_control", "export")}
    assert {a["path"] for a in registry.values()} <= set(declared_outs(REPO))
    for name, artifact in registry.items():
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"], name
        assert all(NAME.fullmatch(word) for word in (name, *artifact["labels"])), (name, artifact["labels"])


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_run_from_the_default_remote_instead_of_retraining(micro_repo, tmp_path,
                                                                                      monkeypatch):
    """The committed default remote (`~/.cache/gpt-pipeline/dvc-remote`, one per user) with HOME in
    tmp_path: the clone that trained pushes, a second clone of it pulls with no configuration, its
    `dvc repro` reruns nothing, and the pulled checkpoints score what they scored where they were trained."""
    from pipeline.config import load_params
    from pipeline.runner import run_stage

    home = {"HOME": str(tmp_path / "home")}
    ours = committed_copy(micro_repo, tmp_path / "ours")
    sh(ours, "dvc", "push", **home)
    assert any((tmp_path / "home" / ".cache" / "gpt-pipeline" / "dvc-remote" / "files" / "md5").iterdir())

    sh(tmp_path, "git", "clone", "-q", str(ours), "theirs")
    theirs = tmp_path / "theirs"
    assert not (theirs / "artifacts" / "pretrain").exists()
    sh(theirs, "dvc", "pull", **home)
    out = sh(theirs, "dvc", "repro", **home)
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out
    missing = [p for p in declared_outs(theirs) if not (theirs / p).exists()]
    assert not missing, missing

    # evaluate in-process in the clone (as `python -m stages.evaluate` does, without its ~10 s of imports):
    # it loads every pulled checkpoint and the reward model and must reproduce the committed table
    (theirs / "metrics" / "evaluate.json").unlink()
    monkeypatch.chdir(theirs)
    run_stage("evaluate", load_params(theirs / "params.yaml"))
    assert (json.loads((theirs / "metrics" / "evaluate.json").read_text())
            == json.loads((ours / "metrics" / "evaluate.json").read_text()))


@pytest.mark.slow
def test_experiments_pushed_to_a_git_remote_show_with_their_metrics_in_another_clone(micro_repo, tmp_path):
    """Two experiments, `dvc exp run -S evaluate.max_problems=…`: the baseline's value (nothing reruns)
    and a smaller one (only evaluate and report rerun), pushed with `dvc exp push` (refs to a bare git
    remote, outputs to the default DVC remote, with HOME in tmp_path); a clone of the git remote pulls
    them with `dvc exp pull`, `dvc exp show` lists both with their params and metrics, and `dvc exp
    apply` restores one there, checkpoints included (the pulled cache)."""
    home = {"HOME": str(tmp_path / "home")}  # for the commands that reach the DVC remote
    ours = committed_copy(micro_repo, tmp_path / "ours")
    origin = str(tmp_path / "origin.git")
    sh(tmp_path, "git", "init", "-q", "--bare", origin)
    branch = sh(ours, "git", "rev-parse", "--abbrev-ref", "HEAD").strip()
    sh(ours, "git", "remote", "add", "origin", origin)
    sh(ours, "git", "push", "-q", "origin", branch)

    # the baseline first: with a clean workspace nothing reruns (the cheap way to get a second experiment)
    ran = {}
    for name, n in (("all-16", 16), ("few-4", 4)):
        log = sh(ours, "dvc", "exp", "run", "-n", name, "-S", f"evaluate.max_problems={n}")
        ran[name] = {s for s in STAGES if f"Running stage '{s}'" in log}
    assert ran == {"all-16": set(), "few-4": {"evaluate", "report"}}, ran
    sh(ours, "dvc", "exp", "push", "origin", "all-16", "few-4", **home)

    sh(tmp_path, "git", "clone", "-q", "-b", branch, origin, "theirs")
    theirs = tmp_path / "theirs"
    sh(theirs, "dvc", "exp", "pull", "origin", "all-16", "few-4", **home)
    shown = experiments(theirs)
    assert set(shown) == {"all-16", "few-4"}, sorted(shown)
    assert [shown[name]["params"]["params.yaml"]["data"]["evaluate"]["max_problems"] for name in ("all-16", "few-4")] \
        == [16, 4]
    table = {name: shown[name]["metrics"]["metrics/evaluate.json"]["data"] for name in shown}
    assert table["all-16"] == json.loads((theirs / "metrics" / "evaluate.json").read_text())  # the baseline's
    assert table["few-4"] == json.loads((ours / "metrics" / "evaluate.json").read_text())  # as run in ours
    assert table["few-4"]["sft"]["val_loss"] != table["all-16"]["sft"]["val_loss"]

    sh(theirs, "dvc", "exp", "apply", "few-4")
    assert (theirs / "artifacts" / "aligned" / "model.safetensors").is_file()
    assert json.loads((theirs / "metrics" / "evaluate.json").read_text()) == table["few-4"]
