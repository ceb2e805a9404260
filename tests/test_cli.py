"""The command lines users type: Hydra single runs and multiruns, and clear failures on bad config."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose_micro, venv_env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python <args>` in `cwd` with the repo importable (as `dvc repro` has it from the repo root)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=venv_env(WANDB_MODE="disabled", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)


def staged_dir(chain: Path, dest: Path) -> Path:
    """A working dir holding the chain's prepared data and tokenizer, nothing trained."""
    shutil.copytree(chain / "data", dest / "data")
    shutil.copytree(chain / "artifacts" / "tokenizer", dest / "artifacts" / "tokenizer")
    return dest


def test_hydra_multirun_runs_one_job_per_value(micro_chain, tmp_path):
    work = staged_dir(micro_chain, tmp_path)
    proc = run(["-m", "pipeline", "-m", "stage=pretrain", "experiment=micro", "model.n_layer=1,2",
                "pretrain.max_steps=3"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in (work / "multirun").glob("*/*") if p.is_dir())
    assert len(jobs) == 2
    layers = sorted(yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs)
    assert ["model.n_layer=1" in o for o in layers[0]] and any("model.n_layer=2" in o for o in layers[1])
    assert (work / "artifacts" / "pretrain" / "model.safetensors").is_file()


def test_stage_without_a_choice_explains_itself(tmp_path):
    proc = run(["-m", "pipeline"], tmp_path)
    assert proc.returncode == 2 and "choose a stage" in proc.stderr


def test_bad_model_config_fails_before_training_and_writes_nothing(micro_chain, tmp_path):
    work = staged_dir(micro_chain, tmp_path)
    cfg = compose_micro()
    cfg.model.n_head = 3  # 32 is not divisible by 3
    (work / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    proc = run(["-m", "stages.pretrain"], work)
    assert proc.returncode == 2
    assert "model.n_embd (32) must be divisible by model.n_head (3)" in proc.stderr
    assert not (work / "artifacts" / "pretrain").exists()
    assert not (work / "metrics" / "pretrain.json").exists()


def test_missing_upstream_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(compose_micro()))
    proc = run(["-m", "stages.sft"], tmp_path)
    assert proc.returncode == 2
    assert "tokenizer" in proc.stderr and "dvc repro" in proc.stderr
