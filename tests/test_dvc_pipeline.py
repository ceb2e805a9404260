"""End to end with real DVC in a temp copy of the repo: repro, up to date, partial rerun, exp run, W&B.

The copy defaults to the micro experiment with W&B offline, so the whole chain takes about a
minute (each stage is its own process and imports Lightning).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import repo_copy, venv_env
from wandb_records import run_info

TRAINING_STAGES = {"pretrain", "sft", "reward", "align", "sft_control"}
ALL_STAGES = ("prepare", "tokenizer", "pretrain", "sft", "reward", "align", "sft_control", "evaluate", "report")


def dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(["dvc", *args], cwd=repo, env=venv_env(WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory) -> Path:
    repo = repo_copy(tmp_path_factory.mktemp("repo"))
    config = repo / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - experiment: null", "  - experiment: micro"))
    # micro's own override turns W&B off; put it back on for this test
    micro = repo / "conf" / "experiment" / "micro.yaml"
    micro.write_text(micro.read_text().replace("  - override /logger: none\n", ""))
    subprocess.run(["python", "-m", "pipeline.params"], cwd=repo, env=venv_env(), check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qam", "micro defaults"], cwd=repo, check=True, capture_output=True,
                   env=venv_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                GIT_COMMITTER_EMAIL="t@t"))
    dvc(repo, "repro")
    return repo


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_metrics(micro_repo):
    for stage in ALL_STAGES[:-1]:
        assert (micro_repo / "metrics" / f"{stage}.json").is_file(), stage
    table = json.loads((micro_repo / "metrics" / "evaluate.json").read_text())
    assert set(table) == {"pretrain", "sft", "sft_control", "aligned", "verdict"}
    verdict = table.pop("verdict")
    assert verdict["method"] == "ppo" and {"beats_sft", "beats_control", "reward_hacking"} <= set(verdict)
    for row in table.values():
        assert {"val_loss", "perplexity", "exact_match", "reward", "kl_to_sft"} <= set(row)
    assert table["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    assert table["pretrain"]["kl_to_sft"] > 0
    report = (micro_repo / "reports" / "report.md").read_text()
    assert "| exact_match |" in report and "### pretrain" in report
    proc = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=micro_repo, env=venv_env(),
                          capture_output=True, text=True, timeout=120)
    files = {Path(f).stem for ws in json.loads(proc.stdout).values() for f in ws["data"]}
    assert set(ALL_STAGES[:-1]) <= files


@pytest.mark.slow
def test_wandb_has_one_offline_run_per_training_stage_in_one_group(micro_repo):
    runs = [run_info(d) for d in sorted((micro_repo / "wandb").glob("offline-run-*"))]
    assert {r["job_type"] for r in runs} == TRAINING_STAGES
    assert len(runs) == len(TRAINING_STAGES)
    assert len({r["group"] for r in runs}) == 1
    by_stage = {r["job_type"]: r for r in runs}
    assert "train/loss" in by_stage["pretrain"]["history_keys"] and "val/loss" in by_stage["pretrain"]["history_keys"]
    assert "objective/kl" in by_stage["align"]["history_keys"]


@pytest.mark.slow
def test_second_repro_is_up_to_date(micro_repo):
    out = dvc(micro_repo, "repro")
    assert "Running stage" not in out
    assert "up to date" in out


@pytest.mark.slow
def test_exp_run_with_a_changed_sft_param_reruns_only_sft_and_after(micro_repo):
    out = dvc(micro_repo, "exp", "run", "-S", "sft.max_steps=4")
    ran = {s for s in ALL_STAGES if f"Running stage '{s}'" in out}
    assert ran == {"sft", "reward", "align", "sft_control", "evaluate", "report"}, out[-2000:]
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    assert params["sft"]["max_steps"] == 4  # DVC's Hydra integration recomposed conf/ with the override
    assert json.loads((micro_repo / "metrics" / "sft.json").read_text())["wall_time_s"] >= 0


@pytest.mark.slow
def test_exp_run_switches_the_alignment_method(micro_repo):
    out = dvc(micro_repo, "exp", "run", "-S", "align=dpo", "-n", "micro-dpo")
    ran = {s for s in ALL_STAGES if f"Running stage '{s}'" in out}
    assert ran == {"align", "sft_control", "evaluate", "report"}, out[-2000:]  # SFT and the reward model are reused
    align = json.loads((micro_repo / "metrics" / "align.json").read_text())
    assert align["method"] == "dpo" and "rewards/accuracies" in align
    verdict = json.loads((micro_repo / "metrics" / "evaluate.json").read_text())["verdict"]
    assert verdict["method"] == "dpo"
    control = json.loads((micro_repo / "metrics" / "sft_control.json").read_text())
    assert control["matches"] == "dpo" and control["steps"] == align["policy_updates"]
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=micro_repo, env=venv_env(), capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "micro-dpo" in shown.stdout
