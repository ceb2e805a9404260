"""Adding an alignment method touches one module and one YAML: docs/extending.md's toy method, applied to a
copy of the project, leaves dvc.yaml and params.yaml as they are and aligns the micro chain."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, repo_copy, venv_env

FILE_BLOCK = re.compile(r"```\w+\n# file: (?P<path>\S+)\n(?P<text>.*?)```", re.S)


def toy_files() -> dict[str, str]:
    """The files docs/extending.md's toy example adds, by path."""
    blocks = {m["path"]: m["text"] for m in FILE_BLOCK.finditer((REPO / "docs" / "extending.md").read_text())}
    assert set(blocks) == {"pipeline/alignment/methods/rft.py", "conf/align/rft.yaml"}, sorted(blocks)
    return blocks


@pytest.mark.slow
def test_the_documented_toy_method_is_the_whole_change(micro_chain, tmp_path):
    project = repo_copy(tmp_path / "project")
    for path, text in toy_files().items():
        (project / path).write_text(text)
    env = venv_env(PYTHONPATH=str(project), WANDB_MODE="disabled")
    check = subprocess.run([sys.executable, "-m", "pipeline.harness.dvcfile", "--check"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr  # dvc.yaml is still what the chain says
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert sorted(line.split()[-1] for line in status.splitlines()) == ["conf/align/rft.yaml",
                                                                        "pipeline/alignment/methods/rft.py"]

    work = tmp_path / "work"
    shutil.copytree(micro_chain, work, ignore=shutil.ignore_patterns("wandb", "outputs"))
    run = subprocess.run([sys.executable, "-m", "pipeline", "stage=align", "align=rft", "experiment=micro",
                          "align.steps=2", "align.rollout_batch=4", "align.max_new_tokens=6",
                          "trainer.progress_bar=false"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "align.json").read_text())
    assert metrics["method"] == "rft" and metrics["policy_updates"] == 2 and metrics["iterations"] == 2
    assert 0.0 <= metrics["train/reward"] <= 1.0 and "kept_first" in metrics
    meta = json.loads((work / "artifacts" / "aligned" / "meta.json").read_text())
    assert meta["method"] == "rft" and meta["step"] == 2
