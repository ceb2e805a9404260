"""Evaluate and chat on the configured hardware: `trainer.accelerator`, `trainer.precision`, `trainer.devices`.

No CUDA here: the placement module's CUDA device is replaced by a recorded stand-in (this CPU), and the
precision is what shows that every model was placed (bf16-true weights; bf16-mixed autocast), read at every
GPT forward pass. Two processes run for real (gloo), in a subprocess: Fabric's launcher re-executes the
command line for rank 1, which must never be pytest's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_micro, micro_config, venv_env

# 2 chunks of the eval split (the second sampling 2 of its 4) and 2 of the hard split: each rank gets some of both
SMALL = ("evaluate.max_problems=8", "evaluate.batch_size=4", "evaluate.samples=6")


def workspace(chain: Path, dest: Path) -> Path:
    """A copy of the micro chain's inputs and checkpoints, so evaluate can rewrite its metrics there."""
    for part in ("data", "artifacts"):
        shutil.copytree(chain / part, dest / part)
    return dest


@pytest.fixture
def cuda_stand_in(monkeypatch) -> list[int]:
    """accelerator=cuda resolves to this CPU; returns the CUDA indices asked for."""
    from pipeline.inference import placement
    asked: list[int] = []
    monkeypatch.setattr(placement, "cuda_available", lambda: True)
    monkeypatch.setattr(placement, "cuda_count", lambda: 8)
    monkeypatch.setattr(placement, "cuda_device", lambda index: asked.append(index) or torch.device("cpu"))
    return asked


@pytest.fixture
def forwards(monkeypatch) -> list[tuple[int, torch.dtype, bool, torch.dtype]]:
    """(model id, weight dtype, autocast on, autocast dtype) at every GPT forward pass, backbones included."""
    from pipeline.model.gpt import GPT
    seen: list[tuple[int, torch.dtype, bool, torch.dtype]] = []
    hidden = GPT._hidden

    def recorded(self, *args, **kwargs):
        seen.append((id(self), self.wte.weight.dtype, torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return hidden(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "_hidden", recorded)
    return seen


@pytest.mark.parametrize(("precision", "weights", "autocast"), [("bf16-true", torch.bfloat16, False),
                                                                 ("bf16-mixed", torch.float32, True)])
def test_every_model_evaluate_scores_runs_on_the_accelerator_in_its_precision(
        micro_chain, tmp_path, monkeypatch, cuda_stand_in, forwards, precision, weights, autocast):
    from stages import run_stage
    monkeypatch.chdir(workspace(micro_chain, tmp_path))
    table = run_stage("evaluate", compose_micro("trainer.accelerator=cuda", f"trainer.precision={precision}", *SMALL))
    assert cuda_stand_in and set(cuda_stand_in) == {0}  # rank 0's device
    models = {m for m, *_ in forwards}
    # 4 checkpoints + the SFT reference + the reward model's backbone (and its frozen likelihood copy)
    assert len(models) >= 6
    assert {(dtype, on) for _, dtype, on, _ in forwards} == {(weights, autocast)}
    if autocast:
        assert {dtype for *_, dtype in forwards} == {torch.bfloat16}
    assert all(table[name]["val_loss"] > 0 for name in ("pretrain", "sft", "aligned", "sft_control"))


def test_a_missing_accelerator_stops_evaluate_before_work(in_chain, monkeypatch):
    from pipeline.inference import placement
    from pipeline.model import handoff
    from stages import run_stage
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    monkeypatch.setattr(handoff, "load_gpt", lambda *a, **k: pytest.fail("evaluate loaded a checkpoint"))
    before = (in_chain / "metrics" / "evaluate.json").read_bytes()
    with pytest.raises(ValueError, match=r"trainer\.accelerator=gpu .*no CUDA.*trainer\.accelerator=cpu"):
        run_stage("evaluate", compose_micro("trainer.accelerator=gpu"))
    assert (in_chain / "metrics" / "evaluate.json").read_bytes() == before


def test_chat_runs_on_the_accelerator_and_refuses_a_missing_one(in_chain, monkeypatch, cuda_stand_in, forwards,
                                                              capsys):
    from pipeline import cli
    from pipeline.inference import placement
    monkeypatch.setattr(cli, "_config", lambda: micro_config("trainer.accelerator=gpu", "trainer.precision=bf16-true"))
    args = cli.parse_args(["generate", "--stage", "sft", "--prompt", "What is 2 + 3?", "--temperature", "1",
                           "--max-new-tokens", "4"])
    model, tok, sampling, where = cli._load(args)
    assert model.wte.weight.dtype == torch.bfloat16 and cuda_stand_in == [0]
    chat = cli.Chat(model, tok, sampling, 0, where)
    chat.reply("What is 2 + 3?")
    assert chat.generator.device == model.wte.weight.device
    assert forwards and {dtype for _, dtype, *_ in forwards} == {torch.bfloat16}
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    assert cli.main(["generate", "--stage", "sft", "--prompt", "hi"]) == 2
    assert "trainer.accelerator=gpu" in capsys.readouterr().err


def test_placement_follows_the_trainer_fields(monkeypatch, cuda_stand_in):
    from pipeline.config.training import TrainerConfig
    from pipeline.inference import placement
    from pipeline.inference.placement import Placement
    assert Placement.from_config(TrainerConfig(accelerator="cuda", devices=[2, 5]), local_rank=1).device.type == "cpu"
    assert cuda_stand_in == [5]  # local rank 1 -> the second listed id
    assert placement.world_size(TrainerConfig(accelerator="gpu", devices=4, num_nodes=2)) == 8
    assert placement.world_size(TrainerConfig(accelerator="gpu", devices="auto")) == 8
    with pytest.raises(ValueError, match=r"trainer\.devices=9 .* 8 CUDA"):
        placement.world_size(TrainerConfig(accelerator="gpu", devices=9))
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    monkeypatch.setattr(placement, "mps_available", lambda: False)
    auto = Placement.from_config(TrainerConfig(accelerator="auto", precision="16-mixed"))
    assert auto.device == torch.device("cpu") and auto.autocast_dtype == torch.bfloat16  # as Lightning on a CPU
    assert Placement(torch.device("cpu"), "32-true").autocast_dtype is None
    model = Placement(torch.device("cpu"), "bf16-true").place(torch.nn.Linear(2, 2))
    assert model.weight.dtype == torch.bfloat16 and not model.training
    with pytest.raises(ValueError, match=r"trainer\.accelerator=tpu"):
        placement.check_placement(TrainerConfig(accelerator="tpu"))


@pytest.mark.slow
def test_two_processes_write_the_table_one_process_writes(micro_chain, tmp_path, monkeypatch):
    """trainer.devices=2 on CPU (gloo): each rank scores its chunks, rank 0 writes one table, equal to one
    process's: the sampled replies do not depend on how the problems were split."""
    from stages import run_stage
    work = workspace(micro_chain, tmp_path)
    monkeypatch.chdir(work)
    one = run_stage("evaluate", compose_micro(*SMALL))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "experiment=micro", "stage=evaluate", "trainer.devices=2",
                           *SMALL, "hydra.run.dir=."], cwd=work, capture_output=True, text=True, timeout=240,
                          env=venv_env(OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = sorted(p for p in (work / "outputs" / "logs" / "evaluate").glob("*.log") if "-rank" not in p.name)
    assert "Starting with 2 processes" in logs[-1].read_text()  # Fabric's launch, in rank 0's log file
    two = json.loads((work / "metrics" / "evaluate.json").read_text())
    one["verdict"].pop("run_id"), two["verdict"].pop("run_id")  # the run id names the config, devices included
    assert two == json.loads(json.dumps(one))
    assert one["pretrain"]["kl_to_sft"] > 0 and one["pretrain"]["reward"] != 0  # sampled metrics are compared
