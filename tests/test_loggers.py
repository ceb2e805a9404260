"""Loggers and callbacks as config (conf/logger/, conf/callbacks/): several at once, DVCLive's files live while a
stage runs under `dvc exp run`, `dvc plots show` over them, refusals before work that name the entry."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config.root import load_config
from pipeline.evaluation.figures import load_curves, read_steps
from pipeline.training import loggers

from conftest import compose_micro, repo_copy, seeded_workspace, venv_env


def sft(work: Path, *overrides: str) -> dict:
    from stages import run_stage

    with contextlib.chdir(work):
        return run_stage("sft", compose_micro("trainer.progress_bar=false", *overrides))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    return seeded_workspace(tmp_path_factory.mktemp("seeded"))


def test_csv_alone_writes_lightnings_metrics_csv(seeded, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    metrics = sft(seeded, "logger=csv")
    (table,) = (seeded / "outputs" / "csv" / "sft").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(table.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and losses[-1] == pytest.approx(metrics["train_loss"], rel=1e-5)
    hparams = next(table.parent.glob("hparams.yaml")).read_text()
    assert "sft/max_steps: 6" in hparams  # the stage's config, flattened, as the run's hyperparameters


def test_wandb_dvclive_and_csv_together_write_all_three(seeded):
    """In a process of its own, as a user runs it: W&B's records are complete once the process has exited."""
    from wandb_records import run_info

    for old in (seeded / "wandb").glob("offline-run-*"):
        old.rename(old.with_name("old-" + old.name))
    env = {k: v for k, v in venv_env(WANDB_MODE="offline", OMP_NUM_THREADS="1").items() if k != "DVC_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=sft", "experiment=micro",
                           "trainer.progress_bar=false", "logger=[wandb,dvclive,csv]", "hydra.run.dir=."],
                          cwd=seeded, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((seeded / "metrics" / "sft.json").read_text())
    assert list((seeded / "outputs" / "csv" / "sft").glob("version_*/metrics.csv"))
    live = json.loads((seeded / "dvclive" / "sft" / "metrics.json").read_text())
    assert live["val"]["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert max(read_steps(seeded / "dvclive" / "sft" / "plots" / "metrics" / "train" / "loss.tsv")) >= 4
    (run,) = (seeded / "wandb").glob("offline-run-*")
    info = run_info(run)
    assert info["job_type"] == "sft" and info["summary"]["val/loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_configured_callbacks_are_built_and_early_stopping_ends_a_stage(seeded, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # improvements of 100 nats never come: early stopping ends sft at its second validation (step 6 of 12)
    metrics = sft(seeded, "logger=dvclive", "callbacks=[early_stopping,lr_monitor]", "sft.max_steps=12",
                  "sft.val_every=3", "callbacks.early_stopping.min_delta=100", "callbacks.early_stopping.patience=1")
    steps = read_steps(seeded / "dvclive" / "sft" / "plots" / "metrics" / "train" / "loss.tsv")
    assert max(steps) < 8, steps
    assert json.loads((seeded / "artifacts" / "sft" / "meta.json").read_text())["step"] == 6
    assert (seeded / "dvclive" / "sft" / "plots" / "metrics" / "lr-AdamW" / "pg1.tsv").is_file()  # the lr monitor
    assert metrics["train_loss"] > 0


def test_under_dvc_a_training_stage_without_dvclive_is_refused(monkeypatch):
    monkeypatch.setenv("DVC_ROOT", "/somewhere")
    cfg = load_config(compose_micro("logger=csv"))
    with pytest.raises(ValueError, match=r"logger=\[csv\] has no dvclive entry.*dvclive/sft/.*logger=\[csv,dvclive\]"):
        loggers.check(cfg, "sft")
    monkeypatch.delenv("DVC_ROOT")
    loggers.check(cfg, "sft")  # outside DVC it is the user's choice


def test_a_resumed_runs_rows_replace_the_killed_runs_rows_after_its_checkpoint(tmp_path):
    steps = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    steps.parent.mkdir(parents=True)
    # killed after step 7 with a checkpoint at 4: the resumed run logs 5, 7, 9 again, with its own values
    steps.write_text("step\tloss\n1\t9\n3\t8\n5\t7\n7\t6\n5\t7.5\n7\t6.5\n9\t5.5\n")
    loggers.tidy_resumed(tmp_path)
    assert read_steps(steps) == {1: 9.0, 3: 8.0, 5: 7.5, 7: 6.5, 9: 5.5}
    assert steps.read_text().splitlines()[0] == "step\tloss"


def test_the_report_reads_dvclives_step_files_by_split(tmp_path):
    base = tmp_path / "sft" / "plots" / "metrics"
    for name, rows in {"train/loss": "1\t3.0\n3\t2.0\n", "val/loss": "2\t2.5\n", "epoch": "1\t0\n3\t0\n"}.items():
        (base / f"{name}.tsv").parent.mkdir(parents=True, exist_ok=True)
        (base / f"{name}.tsv").write_text(f"step\t{name.rsplit('/', 1)[-1]}\n{rows}")
    curves = load_curves(tmp_path, ["sft", "pretrain"])
    assert curves == {"sft_train": [{"step": 1, "train/loss": 3.0, "epoch": 0.0}, {"step": 3, "train/loss": 2.0,
                                                                                  "epoch": 0.0}],
                      "sft_val": [{"step": 2, "val/loss": 2.5}]}


def _live_loss(path: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError):  # written as the stage runs: absent, or caught mid-write
        return json.loads(path.read_text())["train"]["loss"]
    return None


@pytest.mark.slow
def test_dvc_exp_run_shows_the_running_stages_loss_and_plots_render_after(tmp_path):
    """`dvc exp run` of micro pretrain: once DVCLive wrote a loss, the stage is paused (SIGSTOP, so it cannot end
    meanwhile) and `dvc exp show --json` must report that loss for the workspace; after the run, `dvc plots show`
    renders the stage's step files and the combined train/val chart, with no network."""
    repo = repo_copy(tmp_path / "repo")
    shutil.rmtree(repo / "dvclive")  # the committed run's files, which would read as live ones
    (repo / "metrics" / "pretrain.json").unlink()
    config = repo / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - experiment: null", "  - experiment: micro"))
    env = venv_env(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    subprocess.run(["python", "-m", "pipeline.config"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "micro"], cwd=repo, check=True, capture_output=True,
                   env={**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})
    live = repo / "dvclive" / "pretrain" / "metrics.json"
    log = (tmp_path / "exp.log").open("w")
    proc = subprocess.Popen(["dvc", "exp", "run", "pretrain", "-S", "pretrain.max_steps=60"], cwd=repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while (seen := _live_loss(live)) is None:
            assert proc.poll() is None, (tmp_path / "exp.log").read_text()[-3000:]
            assert time.time() < deadline, "no DVCLive loss within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True,
                                   text=True, timeout=120)
            assert not (repo / "metrics" / "pretrain.json").exists()  # the stage had not ended
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert shown.returncode == 0, shown.stderr[-2000:]
        workspace = next(e for e in json.loads(shown.stdout) if e["rev"] == "workspace")
        running = workspace["data"]["metrics"]["dvclive/pretrain/metrics.json"]["data"]
        assert running["train"]["loss"] == pytest.approx(json.loads(live.read_text())["train"]["loss"])
        assert running["step"] < 60
        assert proc.wait(timeout=600) == 0, (tmp_path / "exp.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    final = json.loads(live.read_text())
    assert final["step"] == 60 and final["train"]["loss"] < seen

    plots = subprocess.run(["dvc", "plots", "show", "--json", "--split"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr[-2000:]
    shown_plots = json.loads(plots.stdout)
    assert "pretrain_loss" in shown_plots["data"]  # the combined train/val chart of dvc.yaml's top-level plots
    (own,) = shown_plots["data"]["dvclive/pretrain/plots/metrics/train/loss.tsv"]
    points = own["anchor_definitions"]["<DVC_METRIC_DATA>"]
    assert float(points[-1]["loss"]) == pytest.approx(final["train"]["loss"]) and int(points[-1]["step"]) >= 55
    html = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert html.returncode == 0, html.stderr[-2000:]
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "dvclive/pretrain/plots/metrics/val/loss.tsv" in page and "pretrain_loss" in page
