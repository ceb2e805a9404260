"""End to end with real DVC in a temp copy of the repo: repro, up to date, partial rerun, exp run, W&B.

The copy defaults to the micro experiment with W&B offline, so the whole chain takes about a
minute (each stage is its own process and imports Lightning).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import registry

from conftest import dvc, venv_env
from wandb_records import run_info

ALL_STAGES = tuple(registry().names)
# what `dvc repro` used to print in every stage (issue 19): each fixed at its cause or filtered by message
# (pipeline/logs.py quiet_known_noise, pipeline/training/objective.py Objective.frozen, the W&B logger's init)
GONE = {"Lightning's litlogger tip": "litlogger", "Lightning's eval-mode warning": "module(s) in eval mode",
        "torch's LeafSpec deprecation": "LeafSpec", "W&B's anonymous setting": "anonymous setting has no effect"}


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
def test_repro_prints_no_known_warning_nor_blank_runs_and_every_stage_leaves_a_log(micro_repo):
    """The console of the fixture's three `dvc repro` runs (killed in pretrain, killed in align, to the end): every
    stage ran in one of them."""
    printed = {p.name: p.read_text() for p in sorted(micro_repo.parent.glob("repro*.log"))}
    assert len(printed) == 3 and all(f"stage {s} done in " in "".join(printed.values()) for s in ALL_STAGES)
    for name, text in printed.items():
        for what, marker in GONE.items():
            assert marker not in text, f"{what} is back in {name}:\n{text[-3000:]}"
        blank = re.search(r"(?:^[ \t]*\n){3,}", text, re.MULTILINE)
        assert not blank, f"3+ blank lines in {name} at {blank.start()}:\n{text[max(0, blank.start() - 500):][:800]}"
    for stage in ALL_STAGES:
        files = sorted((micro_repo / "outputs" / "logs" / stage).glob("*.log"))
        assert files, f"no log file of {stage}"
        assert f"stage {stage} done in " in files[-1].read_text(), files[-1]  # the run that finished, in full
    assert "outputs/logs" not in (micro_repo / "dvc.yaml").read_text()  # never a DVC output or dependency


@pytest.mark.slow
def test_wandb_has_one_offline_run_per_stage_in_one_group(micro_repo):
    """One run per stage, grouped by the pipeline run id; pretrain and align were killed and resumed
    (conftest.KILLS), so their run has two offline directories (the killed process's may lack its records)."""
    runs = [run_info(d) for d in sorted((micro_repo / "wandb").glob("offline-run-*"))]
    runs = [r for r in runs if "job_type" in r]
    assert {r["job_type"] for r in runs} == set(ALL_STAGES)
    assert len({r["run_id"] for r in runs}) == len(ALL_STAGES)
    assert len({r["group"] for r in runs}) == 1
    by_stage = {r["job_type"]: r for r in runs}
    assert "train/loss" in by_stage["pretrain"]["history_keys"] and "val/loss" in by_stage["pretrain"]["history_keys"]
    assert "objective/kl" in by_stage["align"]["history_keys"]
    # the stage's metrics file, as written, is the run's summary (evaluate's table flattened to checkpoint/metric)
    sft = json.loads((micro_repo / "metrics" / "sft.json").read_text())
    assert {k: by_stage["sft"]["summary"][k] for k in sft} == sft
    table = json.loads((micro_repo / "metrics" / "evaluate.json").read_text())
    assert by_stage["evaluate"]["summary"]["aligned/exact_match"] == table["aligned"]["exact_match"]


@pytest.mark.slow
def test_second_repro_is_up_to_date(micro_repo):
    out = dvc(micro_repo, "repro")
    assert "Running stage" not in out
    assert "up to date" in out


def exp_show(repo: Path) -> dict[str, dict]:
    """{experiment name: its `data` entry (params, metrics)} from `dvc exp show --json`."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=venv_env(), capture_output=True,
                                      text=True, timeout=120, check=True).stdout)
    return {exp["name"]: exp["revs"][0]["data"] for baseline in shown for exp in (baseline.get("experiments") or [])
            if exp.get("name")}


@pytest.mark.slow
def test_queued_experiments_rerun_only_what_their_change_touches(micro_repo):
    """`dvc exp run --queue`, run by `dvc queue start`: switching the alignment method (a Hydra group,
    `-S align=dpo`) reruns align and what follows it, while data, tokenizer, pretraining, SFT and the
    reward model come from DVC's run cache. (One queued point: each costs ~a minute of suite time.)"""
    compare = [sys.executable, "-m", "pipeline.evaluation.compare"]
    queued = subprocess.run([*compare, "queue", "dpo"], cwd=micro_repo, env=venv_env(), capture_output=True,
                            text=True, timeout=120)
    assert queued.returncode == 0 and "queued cmp-dpo: dvc exp run -S align=dpo" in queued.stdout, queued.stderr
    dvc(micro_repo, "queue", "start", "-j", "1")
    deadline = time.time() + 480
    while time.time() < deadline:
        status = dvc(micro_repo, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 1, status + dvc(micro_repo, "queue", "logs", "cmp-dpo")
    log = dvc(micro_repo, "queue", "logs", "cmp-dpo")
    ran = {s for s in ALL_STAGES if f"Running stage '{s}'" in log}
    assert ran == {"align", "sft_control", "export", "evaluate", "report"}, ran
    exps = exp_show(micro_repo)
    assert "cmp-dpo" in exps, sorted(exps)
    # DVC's Hydra integration recomposed conf/ with the override into the experiment's params.yaml
    assert exps["cmp-dpo"]["params"]["params.yaml"]["data"]["align"]["method"] == "dpo"
    metrics = {f: v["data"] for f, v in exps["cmp-dpo"]["metrics"].items()}
    align, control = metrics["metrics/align.json"], metrics["metrics/sft_control.json"]
    assert align["method"] == "dpo" and "rewards/accuracies" in align
    assert metrics["metrics/evaluate.json"]["verdict"]["method"] == "dpo"
    assert control["matches"] == "dpo" and control["steps"] == align["policy_updates"]
    # the comparison table: the experiment's row, from its own metrics
    table = subprocess.run([*compare, "table"], cwd=micro_repo, env=venv_env(), capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0, table.stderr
    header, _, dpo = table.stdout.splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in dpo.strip("|").split("|")]))
    verdict = metrics["metrics/evaluate.json"]["verdict"]
    assert cells["experiment"] == "dpo" and cells["method"] == "dpo"
    assert float(cells["vs control"]) == pytest.approx(verdict["exact_match_vs_control"], abs=5e-4)
    assert cells["beats control"] == str(verdict["beats_control"])
    assert int(cells["policy updates"]) == align["policy_updates"]
