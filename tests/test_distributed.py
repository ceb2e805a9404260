"""Training with 2 processes on CPU (gloo), Hydra multirun sweeps and the Optuna sweeper, for real.

Each run is a subprocess (`python -m pipeline ...`) with a timeout: Lightning's DDP launcher
re-executes the command line for rank 1, which must never be pytest's. The workspace is a temp dir
where the micro `prepare` and `tokenizer` stages have run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config.model import GPTConfig
from pipeline.evaluation.figures import load_curves
from pipeline.model.gpt import GPT

from conftest import compose_micro, venv_env
from wandb_records import run_info

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory with the micro data and tokenizer, and a single-process pretrain run as reference."""
    from stages import registry, run_stage

    work = tmp_path_factory.mktemp("dist")
    old = Path.cwd()
    os.chdir(work)
    try:
        cfg = compose_micro("trainer.progress_bar=false", "trainer.peak_tflops=0.5")  # a CPU has no listed peak
        for stage in registry().names[:3]:  # prepare, tokenizer, pretrain
            run_stage(stage, cfg)
    finally:
        os.chdir(old)
    shutil.copytree(work / "artifacts" / "pretrain", work / "reference")
    shutil.copy(work / "metrics" / "pretrain.json", work / "reference" / "metrics.json")
    shutil.copytree(work / "dvclive" / "pretrain", work / "reference" / "dvclive" / "pretrain")
    return work


def test_throughput_and_mfu_are_logged_against_the_configured_peak(workspace):
    metrics = json.loads((workspace / "reference" / "metrics.json").read_text())
    curve = load_curves(workspace / "reference" / "dvclive", ["pretrain"])["pretrain_train"]
    meta = json.loads((workspace / "reference" / "meta.json").read_text())
    flops = GPT(GPTConfig.from_dict(meta["model"])).flops_per_token()
    rows = [r for r in curve if r.get("train/mfu") is not None]
    assert rows and all(r["train/tokens_per_sec"] > 0 for r in rows)
    for r in rows:
        assert r["train/mfu"] == pytest.approx(flops * r["train/tokens_per_sec"] / 0.5e12, rel=1e-3)
    assert metrics["mfu"] > 0 and metrics["val_bpb"] > 0


def pipeline_cmd(cwd: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *overrides, "hydra.run.dir=."], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def torchrun_two_nodes(cwd: Path, *overrides: str, timeout: int = 300) -> None:
    """Two `torchrun` launches on this machine, node ranks 0 and 1, one process each: a 2-node job."""
    port = 29500 + os.getpid() % 1000
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pipeline", *overrides]
    env = venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    procs = [subprocess.Popen(cmd[:5] + ["--node-rank", str(rank)] + cmd[5:], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


@pytest.mark.parametrize("launch", ["fsdp2", "torchrun_2_nodes"])
def test_two_processes_match_one_with_the_same_global_batch(workspace, launch):
    """2 ranks x batch 4 (gloo) trains like 1 process x batch 8: same windows, averaged gradients.

    fsdp2: Lightning's launcher starts the second process (as under `dvc repro` with devices=2);
    torchrun_2_nodes: DDP with trainer=multi_node, two torchrun "nodes" on this machine, as a
    cluster launches it."""
    single = json.loads((workspace / "reference" / "metrics.json").read_text())
    batch = compose_micro().pretrain.batch_size
    common = ("stage=pretrain", "experiment=micro", "trainer.progress_bar=false", f"pretrain.batch_size={batch // 2}")
    if launch == "torchrun_2_nodes":
        torchrun_two_nodes(workspace, *common, "trainer=multi_node", "trainer.accelerator=cpu",
                           "trainer.precision=32-true", "trainer.compile=false", "trainer.matmul_precision=null",
                           "trainer.num_nodes=2", "trainer.devices=1", "strategy=ddp", "hydra.run.dir=.")
    else:
        pipeline_cmd(workspace, *common, f"strategy={launch}", "trainer.devices=2")
    multi = json.loads((workspace / "metrics" / "pretrain.json").read_text())
    assert multi["world_size"] == 2 and multi["global_batch_tokens"] == single["global_batch_tokens"]
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    curve_1, curve_2 = ([r for r in load_curves(root, ["pretrain"])["pretrain_train"] if "train/loss" in r]
                        for root in (workspace / "reference" / "dvclive", workspace / "dvclive"))
    assert len(curve_1) >= 9
    assert [r["step"] for r in curve_1] == [r["step"] for r in curve_2]
    for a, b in zip(curve_1, curve_2):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), (a, b)
    # the checkpoint is whole (gathered from the shards under fsdp2) and equals the single-process one
    w1 = load_file(workspace / "reference" / "model.safetensors")
    w2 = load_file(workspace / "artifacts" / "pretrain" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not list((workspace / "artifacts").glob(".*tmp*"))


def test_multirun_gives_each_job_its_directory_wandb_run_and_metrics(workspace):
    """`-m` over two learning rates: two job dirs, two W&B runs, two metrics files, one summary table;
    the workspace's own checkpoint is untouched."""
    before = (workspace / "artifacts" / "pretrain" / "model.safetensors").read_bytes()
    sweep = workspace / "sweep"
    pipeline_cmd(workspace, "-m", "stage=pretrain", "experiment=micro", "logger=wandb", "trainer.progress_bar=false",
                 "pretrain.optim.lr=1e-3,1e-2", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    losses, lrs = [], []
    for job in jobs:
        metrics = json.loads((job / "metrics" / "pretrain.json").read_text())
        losses.append(metrics["val_loss"])
        assert (job / "artifacts" / "pretrain" / "model.safetensors").is_file()
        assert not (job / "artifacts" / "pretrain").is_symlink()
        assert (job / "artifacts" / "tokenizer").is_symlink()  # upstream outputs are read from the workspace
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        info = run_info(runs[0])
        assert info["job_type"] == "pretrain"
        # the job's own checkpoint (not the workspace's), made from the workspace's tokenizer and tokens
        assert [a["name"] for a in info["made"]] == ["pretrain"] and {a["name"] for a in info["used"]} == {
            "tokenizer", "tokens"}
        lrs.append(info["config"]["pretrain"]["optim"]["lr"])
        assert info["last"]["val/loss"] == pytest.approx(metrics["val_loss"], rel=1e-4)
    assert lrs == [1e-3, 1e-2] and losses[0] != losses[1]
    assert (workspace / "artifacts" / "pretrain" / "model.safetensors").read_bytes() == before
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["overrides"][-1] for r in summary] == ["pretrain.optim.lr=0.001", "pretrain.optim.lr=0.01"]
    table = (sweep / "summary.md").read_text()
    assert "pretrain.val_loss" in table and len(table.strip().splitlines()) == 4


def test_optuna_sweeper_minimises_validation_loss(workspace):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[sweep]'")
    sweep = workspace / "optuna"
    pipeline_cmd(workspace, "sweep=optuna", "experiment=micro", "trainer.progress_bar=false",
                 "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [json.loads((job / "metrics" / "pretrain.json").read_text())["val_loss"]
              for job in sweep.iterdir() if job.name.isdigit()]
    assert len(losses) == 3
    assert results["best_value"] == pytest.approx(min(losses), rel=1e-6)
    assert set(results["best_params"]) == {"pretrain.optim.lr", "pretrain.optim.warmup_steps",
                                           "pretrain.optim.weight_decay"}
