"""A stage that is refused, fails or is interrupted leaves the workspace's previous outputs byte-identical
(pipeline/harness/previous.py), under real `dvc repro` and `dvc exp run` in a copy of the micro repo (every stage
already ran there, W&B on), and outside DVC.

Under DVC the outputs are deleted before the stage's command starts, so what is checked is that they are put back
from DVC's cache as dvc.lock records them: the sha256 of every file under artifacts/, data/, metrics/, dvclive/ and
reports/, and dvc.lock itself, are the same before and after.
The interrupt cases send SIGINT (Ctrl-C, to the whole process group as a terminal does) or SIGTERM while pretrain,
sft or align trains, right after a resume checkpoint: the stage exits with 130 or 143, keeps that checkpoint, closes
its W&B run with the signal's exit code, and the next `dvc repro` resumes from the checkpoint and finishes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, dvc, venv_env
from wandb_records import run_info

pytestmark = pytest.mark.slow
TRACKED = ("artifacts", "data", "metrics", "dvclive", "reports")


def sha256s(repo: Path) -> dict[str, str]:
    files = [p for top in TRACKED for p in sorted((repo / top).rglob("*")) if p.is_file()]
    files += [repo / "dvc.lock"] if (repo / "dvc.lock").is_file() else []
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def set_params(repo: Path, **values) -> None:
    params = OmegaConf.load(repo / "params.yaml")
    for key, value in values.items():
        OmegaConf.update(params, key, value, force_add=True)
    OmegaConf.save(params, repo / "params.yaml")


def run_dvc(repo: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, env=venv_env(WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def repo(micro_repo, tmp_path) -> Path:
    """A copy of the micro repo, up to date, with its DVC cache (what dvc.lock's outputs are restored from)."""
    work = tmp_path / "repo"
    shutil.copytree(micro_repo, work, symlinks=True)
    return work


@pytest.mark.parametrize(("stage", "values", "culprit"), [
    ("prepare", {"data.eval_fraction": 1.5}, "data.eval_fraction is 1.5"),
    ("pretrain", {"model.n_layer": 0}, "model.n_layer is 0"),
    ("sft", {"sft.max_stepz": 10}, "sft.max_stepz is not a setting of sft: did you mean sft.max_steps?"),
])
def test_a_stage_refused_under_dvc_repro_keeps_its_outputs(repo, stage, values, culprit):
    before = sha256s(repo)
    params = (repo / "params.yaml").read_bytes()
    set_params(repo, **values)
    proc = run_dvc(repo, "repro", "-s", stage)
    assert proc.returncode != 0 and culprit in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert changed(before, sha256s(repo)) == []
    (repo / "params.yaml").write_bytes(params)
    assert "Data and pipelines are up to date" in dvc(repo, "status")  # the restored outputs are dvc.lock's


def test_a_failed_dvc_exp_run_keeps_the_outputs_and_says_how_to_restore_params(repo):
    """The README's `dvc exp run -S model.init_from=hf:DIR` without that directory: the tokenizer stage is refused;
    its outputs (the tokenizer, the token shards) stay, and the message says params.yaml holds the experiment's."""
    before = sha256s(repo)
    proc = run_dvc(repo, "exp", "run", "-S", "model.init_from=hf:/nonexistent/gpt2")
    assert proc.returncode != 0 and "/nonexistent/gpt2" in proc.stderr, proc.stderr[-3000:]
    assert "git checkout params.yaml" in proc.stderr, proc.stderr[-3000:]
    assert changed(before, sha256s(repo)) == []


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_ctrl_c_during_evaluate_keeps_its_metrics(repo, tmp_path):
    before = sha256s(repo)
    log = tmp_path / "repro.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "evaluate"], cwd=repo, env=venv_env(WANDB_MODE="offline"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    logs = repo / "outputs" / "logs" / "evaluate"
    known = set(logs.glob("*.log"))
    # the stage is past its checks and evaluating: its log file says which checkpoint it is on
    wait_for(lambda: any("evaluate pretrain:" in p.read_text() for p in set(logs.glob("*.log")) - known), proc,
             120, "evaluate's first checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert "stage 'evaluate' stopped by SIGINT" in log.read_text(), log.read_text()[-3000:]
    assert changed(before, sha256s(repo)) == []


# stage -> a change that makes it rerun, long enough to be interrupted after its second checkpoint
LONGER = {"pretrain": {"pretrain.max_steps": 40}, "sft": {"sft.max_steps": 30}, "align": {"align.steps": 8}}


@pytest.mark.parametrize(("stage", "signum"), [("pretrain", signal.SIGINT), ("sft", signal.SIGTERM),
                                               ("align", signal.SIGINT)])
def test_an_interrupted_training_stage_keeps_its_outputs_and_the_next_repro_resumes(repo, tmp_path, stage, signum):
    before = sha256s(repo)
    set_params(repo, **LONGER[stage])
    state = repo / "outputs" / "resume" / stage / "state.json"
    shutil.rmtree(state.parent, ignore_errors=True)
    wandb_before = set((repo / "wandb").glob("offline-run-*"))
    log = tmp_path / "interrupted.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=repo, env=venv_env(WANDB_MODE="offline"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: state.is_file() and json.loads(state.read_text())["step"] >= 2, proc, 240,
             f"{stage}'s checkpoint of step 2")
    # Ctrl-C reaches the whole foreground group (DVC ignores it while its command runs); SIGTERM only the stage
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        # the stage's own python process, not a shell DVC may start it through (`$SHELL -c "python -m stages.sft"`)
        stage_pid = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
                         _cmdline(p).split(b"\0")[1:3] == [b"-m", f"stages.{stage}".encode()] and _sid(p) == proc.pid)
        os.kill(stage_pid, signum)
    assert proc.wait(timeout=120) != 0
    text = log.read_text()
    name = signal.Signals(signum).name
    assert f"stage '{stage}' stopped by {name}: its previous outputs are kept" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert changed(before, sha256s(repo)) == [], text[-3000:]
    step = json.loads(state.read_text())["step"]
    assert step >= 2 and (state.parent / f"step-{step:08d}.ckpt").is_file()
    (run,) = set((repo / "wandb").glob("offline-run-*")) - wandb_before
    assert run_info(run)["exit_code"] == 128 + signum
    # the next `dvc repro` resumes from that checkpoint and finishes
    again = run_dvc(repo, "repro", "-s", stage, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {stage} from outputs/resume/{stage}/step-" in again.stderr, again.stderr[-3000:]


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def _sid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return -1


def test_outside_dvc_a_failing_stage_puts_its_previous_outputs_back(micro_chain, tmp_path, monkeypatch):
    """Run outside DVC, in a trained workspace, sft fails after its work (its W&B run's close raising, after the new
    checkpoint and metrics were written): every output is the previous one again, byte for byte."""
    from pipeline.harness import runner
    from stages import registry

    work = tmp_path / "work"
    shutil.copytree(micro_chain, work)
    monkeypatch.chdir(work)
    OmegaConf.save(_micro(), work / "params.yaml")
    before = sha256s(work)
    assert (work / "artifacts" / "sft" / "model.safetensors").is_file()

    def fail(*args, **kwargs):
        raise RuntimeError("boom after the work")

    monkeypatch.setattr(runner, "close_stage_run", fail)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_stage(registry(), "sft", _micro())
    assert changed(before, sha256s(work)) == []
    assert not (work / "outputs" / "previous" / "sft").exists()


def _micro():
    from conftest import compose_micro
    return compose_micro()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_python_m_pipeline_writes_its_own_run_directory_unless_asked_for_the_workspace(micro_chain, tmp_path):
    """A smoke run with overrides in a trained workspace leaves the workspace's outputs byte-identical: its own
    land in Hydra's run directory, which it names; `hydra.run.dir=.` is how a user asks for the workspace. Each
    console line is printed once (no second copy through Hydra's logging)."""
    from conftest import chain_copy

    work = chain_copy(micro_chain, tmp_path / "work")
    before = sha256s(work)
    run = [sys.executable, "-m", "pipeline", "stage=pretrain", "experiment=micro", "pretrain.max_steps=2",
           "trainer.progress_bar=false", "logger=dvclive"]
    env = venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    proc = subprocess.run(run, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert changed(before, sha256s(work)) == []
    (out,) = (work / "outputs" / "hydra").iterdir()
    two_steps = json.loads((out / "metrics" / "pretrain.json").read_text())
    assert two_steps["tokens_seen"] == 2 * two_steps["global_batch_tokens"]
    assert f"outputs in outputs/hydra/{out.name}/" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)) and not any("[HYDRA]" in line for line in lines), proc.stderr
    asked = subprocess.run([*run, "hydra.run.dir=."], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert json.loads((work / "metrics" / "pretrain.json").read_text())["tokens_seen"] == two_steps["tokens_seen"]
    assert "artifacts/pretrain/model.safetensors" in changed(before, sha256s(work))
