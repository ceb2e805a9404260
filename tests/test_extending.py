"""Adding an alignment method touches one module and one YAML: docs/extending.md's toy method, applied to a
copy of the project, leaves dvc.yaml and params.yaml as they are, and aligns the micro chain."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose_micro, repo_copy, venv_env

FILE_BLOCK = re.compile(r"```\w+\n# file: (?P<path>\S+)\n(?P<text>.*?)```", re.S)
MODULE, CONF = "pipeline/alignment/methods/rft.py", "conf/align/rft.yaml"


def toy_files() -> dict[str, str]:
    """The files docs/extending.md's toy example adds, by path."""
    blocks = {m["path"]: m["text"] for m in FILE_BLOCK.finditer((REPO / "docs" / "extending.md").read_text())}
    assert set(blocks) == {MODULE, CONF}, sorted(blocks)
    return blocks


def test_the_documented_toy_method_is_the_whole_change(tmp_path):
    """In a copy of the project with the two files added, dvc.yaml is still what the chain says and git sees
    nothing else changed (params.yaml composes the default method, which did not change)."""
    project = repo_copy(tmp_path / "project")
    for path, text in toy_files().items():
        (project / path).write_text(text)
    check = subprocess.run([sys.executable, "-m", "pipeline.harness.dvcfile", "--check"], cwd=project,
                           env=venv_env(PYTHONPATH=str(project)), capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert sorted(line.split()[-1] for line in status.splitlines()) == [CONF, MODULE]


@pytest.mark.slow
def test_the_toy_method_aligns_the_micro_chain(micro_chain, tmp_path, monkeypatch):
    """The module found by name (here from a folder added to the methods package's path), its YAML as the
    `align` group: the generic align stage trains it and records it."""
    from pipeline.alignment import methods
    from stages import run_stage

    files = toy_files()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "rft.py").write_text(files[MODULE])
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path / "plugins")])
    monkeypatch.delitem(sys.modules, "pipeline.alignment.methods.rft", raising=False)
    assert "rft" in methods.names()

    work = tmp_path / "work"
    shutil.copytree(micro_chain, work, ignore=shutil.ignore_patterns("wandb", "outputs"))
    monkeypatch.chdir(work)
    cfg = OmegaConf.to_container(compose_micro("trainer.progress_bar=false"))
    cfg["align"] = {**yaml.safe_load(files[CONF]), "steps": 2, "rollout_batch": 4, "max_new_tokens": 6}
    try:
        metrics = run_stage("align", cfg)
    finally:
        sys.modules.pop("pipeline.alignment.methods.rft", None)  # no later test sees the toy
    assert metrics["method"] == "rft" and metrics["policy_updates"] == 2 and metrics["iterations"] == 2
    assert 0.0 <= metrics["train/reward"] <= 1.0 and "kept_first" in metrics
    meta = json.loads((work / "artifacts" / "aligned" / "meta.json").read_text())
    assert meta["method"] == "rft" and meta["step"] == 2
    assert json.loads((work / "metrics" / "align.json").read_text())["method"] == "rft"
