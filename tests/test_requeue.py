"""SLURM's requeue signal, for real, in a subprocess that Lightning takes for a SLURM job (its environment
variables) with a fake `scontrol` first on PATH: the signal mid-training commits a resume checkpoint,
requeues the job and exits 75 with no outputs; the requeued job's rerun (in-process, in the same SLURM
environment: a subprocess would only add Lightning's import time) resumes from that checkpoint and ends with
the weights of an uninterrupted run.

The subprocess's training batches are slowed down (a sitecustomize on PYTHONPATH, SLOW_BATCH_S) so that
the signal, sent once the first checkpoint is committed, lands while there are steps left to train.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_micro, seeded_workspace, venv_env

RUN = ("stage=sft", "experiment=micro", "trainer.progress_bar=false", "sft.max_steps=12", "resume.every_n_steps=2")
JOB = "4242"
SLOW = '''\
import os
if os.environ.get("SLOW_BATCH_S"):  # this test's subprocesses only: every training batch takes longer
    import time
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    advance = _TrainingEpochLoop.advance
    def slow(self, *args, **kwargs):
        time.sleep(float(os.environ["SLOW_BATCH_S"]))
        return advance(self, *args, **kwargs)
    _TrainingEpochLoop.advance = slow
'''


def slurm_env(tmp: Path) -> dict[str, str]:
    """What srun gives one task of job 4242, a fake scontrol first on PATH (it logs its arguments)."""
    bin_dir, hook = tmp / "bin", tmp / "hook"
    bin_dir.mkdir(exist_ok=True)
    hook.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    (hook / "sitecustomize.py").write_text(SLOW)
    env = venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline", SLURM_JOB_ID=JOB, SLURM_JOB_NAME="gpt-pipeline-sft",
                   SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1",
                   SLURM_NODELIST="localhost", SCONTROL_LOG=str(tmp / "scontrol.log"), PYTHONPATH=str(hook),
                   SLOW_BATCH_S="0.25")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def committed_step(work: Path) -> int:
    state = work / "outputs" / "resume" / "sft" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0  # replaced atomically


def signal_after_first_checkpoint(proc: subprocess.Popen, work: Path, timeout: float = 120) -> None:
    """SIGUSR2 to `proc` once its first checkpoint is committed (training runs, the handler is in place)."""
    deadline = time.time() + timeout
    while committed_step(work) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR2)


def test_the_slurm_requeue_signal_checkpoints_requeues_and_the_rerun_resumes(tmp_path, monkeypatch):
    """SIGUSR2, resume.requeue_signal's default: what submitit (cluster=slurm) sends before the time limit."""
    from stages import run_stage

    (tmp_path / "work").mkdir()
    work = seeded_workspace(tmp_path / "work", "trainer.progress_bar=false")
    reference = tmp_path / "reference"
    shutil.copytree(work, reference)

    env, log = slurm_env(tmp_path), tmp_path / "requeued.log"
    cmd = [sys.executable, "-m", "pipeline", *RUN, "hydra.run.dir=."]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sent = threading.Thread(target=signal_after_first_checkpoint, args=(proc, work), daemon=True)
    sent.start()  # while the uninterrupted run trains here, in-process (on the other core)
    with contextlib.chdir(reference):
        run_stage("sft", compose_micro(*RUN[1:]))
    sent.join(timeout=150)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    state = json.loads((work / "outputs" / "resume" / "sft" / "state.json").read_text())
    step = state["step"]
    assert 2 < step < 12 and not state["final"], state  # committed at the step where it stopped, mid-run
    assert f"the checkpoint of step {step} is committed" in text and f"job {JOB} requeued" in text, text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split("\n")[:-1] == [f"requeue {JOB}"]
    assert not (work / "metrics" / "sft.json").exists() and not (work / "artifacts" / "sft").exists()

    for key, value in env.items():  # the requeued job: the same job's environment, no signal this time
        if key.startswith("SLURM_") or key in ("PATH", "SCONTROL_LOG"):
            monkeypatch.setenv(key, value)
    with contextlib.chdir(work), contextlib.redirect_stderr(io.StringIO()) as err:
        run_stage("sft", compose_micro(*RUN[1:]))
    assert f"resuming sft from outputs/resume/sft/step-{step:08d}.ckpt (step {step}," in err.getvalue(), err.getvalue()
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1
    got, want = (load_file(d / "artifacts" / "sft" / "model.safetensors") for d in (work, reference))
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, atol=1e-6, rtol=0)
    assert json.loads((work / "metrics" / "sft.json").read_text())["val_loss"] == pytest.approx(
        json.loads((reference / "metrics" / "sft.json").read_text())["val_loss"], abs=1e-6)
