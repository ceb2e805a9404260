"""The RLHF half of the chain on several processes (2 gloo ranks on CPU, each run a subprocess with a timeout:
Lightning's launcher re-executes the command line for rank 1, which must never be pytest's).

- reward and DPO are data parallel: at world size 2 with half the per-device batch (the same global batch) their
  metrics and weights equal one process's, under DDP and under FSDP2;
- PPO and GRPO: every row of the global rollout batch goes to exactly one rank, and one minibatch's loss and
  gradient on two ranks equal one process's on the same samples (tests/scale_out_worker.py);
- a GRPO run on two ranks killed after a resume checkpoint and rerun ends where the uninterrupted run ends.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_until_checkpoint, venv_env

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # 2 gloo ranks per run: one such test at a time

# measured, or a property of each rank's own layout (`padding`: a rank packs its half of the batch, with a last
# row of its own), or (`tokens`) counted differently by a resumed online run: compared where it must agree
NOT_COMPARED = {"wall_time_s", "run_id", "device", "tokens_per_sec", "tokens", "padding",
                "generation_s_per_iteration", "training_s_per_iteration", "generation_share", "eval_s", "eval_share"}
# on-policy pairs sampled 8 draws at a time: several sampling batches, so two ranks share them
COMMON = ("experiment=micro", "trainer.progress_bar=false", "reward.on_policy.batch_size=8")


def pipeline_cmd(cwd: Path, *overrides: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *COMMON, *overrides, "hydra.run.dir=."], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    # a rank that crashes shows first in the log; the other rank's "Connection closed by peer" last
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def workspace(micro_chain, tmp_path_factory) -> Path:
    """The micro chain's data, tokenizer and SFT checkpoint, in a directory of its own."""
    work = tmp_path_factory.mktemp("scale_out")
    shutil.copytree(micro_chain / "data", work / "data")
    for name in ("tokenizer", "sft", "reward"):  # reward: align's monitor scores with it
        shutil.copytree(micro_chain / "artifacts" / name, work / "artifacts" / name)
    return work


def outputs(work: Path, metrics: str, checkpoint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((work / "metrics" / f"{metrics}.json").read_text()),
            load_file(work / "artifacts" / checkpoint / "model.safetensors"))


def assert_same_run(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (m2, w2), (m1, w1) = got, want
    numbers = {k for k, v in m1.items() if isinstance(v, (int, float)) and k not in NOT_COMPARED}
    assert numbers and numbers <= set(m2)
    for k in sorted(numbers):
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)


# stage overrides, the metrics file, the checkpoint, the per-device batch key and its one-process value
RUNS = {"reward": (("stage=reward",), "reward", "reward", "reward.batch_size", 8),
        "dpo": (("stage=align", "align=dpo", "align.on_policy.batch_size=8"), "align", "aligned", "align.batch_size",
                8)}


@pytest.fixture(scope="module")
def one_process(workspace) -> dict[str, tuple[dict, dict]]:
    """Each of reward and DPO on one process, its outputs kept aside."""
    kept = {}
    for name, (stage, metrics, checkpoint, _, _) in RUNS.items():
        pipeline_cmd(workspace, *stage)
        kept[name] = outputs(workspace, metrics, checkpoint)
    return kept


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_ranks_train_reward_and_dpo_as_one_process_does(workspace, one_process, name, strategy):
    stage, metrics, checkpoint, batch_key, batch = RUNS[name]
    # align's monitor evaluates on rank 0 under DDP (its points are the one process's); sharded weights refuse it
    unwatched = ("align.eval_every=0",) if name == "dpo" and strategy == "fsdp2" else ()
    log = pipeline_cmd(workspace, *stage, "trainer.devices=2", f"strategy={strategy}", f"{batch_key}={batch // 2}",
                       *unwatched)
    got = outputs(workspace, metrics, checkpoint)
    assert got[0]["device"].startswith("2 x "), got[0]["device"]
    want = one_process[name]
    if unwatched:  # the one-process run's numbers less its evaluations'
        want = ({k: v for k, v in want[0].items() if not k.startswith(("eval", "best_", "kept"))}, want[1])
    assert_same_run(got, want)
    if name == "dpo" and not unwatched:
        assert got[0]["eval_points"] == want[0]["eval_points"] > 1
    # the on-policy pairs were sampled in shares by the two ranks, then joined: the same pairs
    assert got[0]["on_policy_pairs"] == one_process[name][0]["on_policy_pairs"] > 0
    assert got[0]["tokens"] == one_process[name][0]["tokens"] > 0  # real tokens: the same on any number of ranks
    assert "Traceback" not in log


def test_online_methods_split_the_rollout_and_compute_one_process_gradients(workspace, tmp_path):
    out = tmp_path / "worker.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scale_out_worker.py"), str(workspace / "data" /
                           "prepared"), str(out)], capture_output=True, text=True, timeout=300,
                          env=venv_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    prompts = report["prompts"]
    assert prompts["per_rank"] == [4, 4]  # a global rollout batch of 8 prompts: half on each rank
    assert len(prompts["one"]) == 3 and all(len(b) == 8 for b in prompts["one"])
    assert prompts["two"] == prompts["one"]  # each row of each iteration's global batch sampled once, by one rank
    for method in ("grpo", "ppo"):
        r = report[method]
        assert r["loss_two"] == pytest.approx(r["loss_one"], abs=1e-5), method
        assert r["grad_max"] > 1e-3 and r["grad_max_diff"] < 1e-5, (method, r)


def test_two_rank_grpo_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(workspace, tmp_path):
    run = ("stage=align", "align=grpo", "align.steps=4", "trainer.devices=2", "strategy=ddp",
           "resume.every_n_iterations=1")
    log = pipeline_cmd(workspace, *run)
    assert "resuming" not in log
    metrics, weights = outputs(workspace, "align", "aligned")
    assert metrics["iterations"] == 4 and metrics["generation_s_per_iteration"] > 0
    assert 0 < metrics["generation_share"] < 1
    shutil.rmtree(workspace / "outputs" / "resume", ignore_errors=True)
    (workspace / "metrics" / "align.json").unlink()
    cmd = [sys.executable, "-m", "pipeline", *COMMON, *run, "hydra.run.dir=."]
    step = run_until_checkpoint(cmd, workspace, venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline"), "align", 2,
                                tmp_path / "killed.log")
    assert step < 4 and not (workspace / "metrics" / "align.json").exists()
    log = pipeline_cmd(workspace, *run)
    assert f"resuming align from outputs/resume/align/step-{step:08d}.ckpt" in log
    assert_same_run(outputs(workspace, "align", "aligned"), (metrics, weights))
