"""Reliability of training: SIGKILL mid-run and resume, NaN stops with the last good checkpoint,
determinism, and the resumable samplers behind exact resumption.

The kills happen in the session fixture `micro_repo` (conftest): its `dvc repro` of the micro chain is
SIGKILLed in pretrain and in align and rerun, and must end where the uninterrupted in-process chain
(`micro_chain`) ends.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.io import file_sha256

from conftest import KILLS, compose_micro
from wandb_records import run_info

TIMING = {"wall_time_s", "tokens_per_sec", "mfu"}  # measured, not computed: differ between any two runs
# the reference run is in-process, from this checkout (another commit, another config): another run id
NOT_COMPARED = TIMING | {"run_id"}


def same_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in set(want) - NOT_COMPARED:
        if isinstance(want[key], float):
            assert got[key] == pytest.approx(want[key], abs=1e-4), key
        else:
            assert got[key] == want[key], key


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(KILLS))
def test_dvc_repro_after_sigkill_resumes_to_the_uninterrupted_result(stage, micro_repo, micro_chain):
    """The micro_repo fixture's `dvc repro` was SIGKILLed (whole process group) in pretrain and in
    align right after a resume checkpoint, then rerun (conftest.KILLS). The killed stage left no
    output; the rerun resumed from that checkpoint under the same W&B run id; and its metrics equal
    those of the uninterrupted in-process chain (micro_chain) to 1e-4."""
    kill = json.loads((micro_repo.parent / "kills.json").read_text())[stage]
    total = {"pretrain": 20, "align": 3}[stage]  # micro: steps; iterations incl. the critic warmup
    assert KILLS[stage] <= kill["step"] < total, kill  # mid-run
    assert kill["outputs_left"] == []  # nothing DVC or the next stage could take for a finished output
    logs = "".join(p.read_text() for p in sorted(micro_repo.parent.glob("repro*.log")))
    assert f"resuming {stage} from outputs/resume/{stage}/step-{kill['step']:08d}.ckpt (step {kill['step']}," in logs
    got, want = (json.loads((d / "metrics" / f"{stage}.json").read_text()) for d in (micro_repo, micro_chain))
    same_metrics(got, want)
    # W&B names an offline run's directory offline-run-<time>-<id>; the killed process may not have
    # flushed its records, the resumed one's own records name the stage
    by_id: dict[str, list[Path]] = {}
    for d in (micro_repo / "wandb").glob("offline-run-*"):
        by_id.setdefault(d.name.rsplit("-", 1)[1], []).append(d)
    ids = {run_id for run_id, dirs in by_id.items() for d in dirs if run_info(d).get("job_type") == stage}
    assert len(ids) == 1 and len(by_id[ids.pop()]) == 2, by_id  # one run, continued by the resumed process
    assert not (micro_repo / "outputs" / "resume" / stage).exists()  # done: a rerun must not resume


def test_a_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(micro_chain, tmp_path, monkeypatch, capsys):
    from pipeline.training.lm import LanguageModeling
    from stages import main

    work = tmp_path / "work"
    shutil.copytree(micro_chain, work, ignore=shutil.ignore_patterns("wandb", "outputs"))
    monkeypatch.chdir(work)
    shutil.rmtree("artifacts/pretrain")
    Path("metrics/pretrain.json").unlink()
    OmegaConf.save(compose_micro(), "params.yaml")  # micro: a checkpoint and a check every 2 steps
    healthy = LanguageModeling.training_step

    def poisoned(self, batch, batch_idx):  # from the 8th optimizer step on, the loss is NaN
        loss = healthy(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 7 else loss

    monkeypatch.setattr(LanguageModeling, "training_step", poisoned)
    with pytest.raises(SystemExit) as stop:
        main("pretrain")
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert "loss became NaN/inf by step 8" in err and "last good checkpoint (step 6)" in err, err

    state = json.loads(Path("outputs/resume/pretrain/state.json").read_text())
    ckpt = Path("outputs/resume/pretrain") / state["checkpoint"]
    assert state["step"] == 6 and sorted(p.name for p in ckpt.parent.iterdir()) == sorted([ckpt.name, "state.json"])
    assert file_sha256(ckpt) == state["sha256"]  # not rewritten after the fault
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not Path("artifacts/pretrain").exists() and not Path("metrics/pretrain.json").exists()

    with ckpt.open("ab") as fh:  # the checkpoint is changed behind the pipeline's back: refused, not loaded
        fh.write(b"\0")
    with pytest.raises(SystemExit) as refused:
        main("pretrain")
    assert refused.value.code == 2 and f"{ckpt} is not the checkpoint this stage wrote" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_metrics(micro_chain, tmp_path, monkeypatch):
    """CPU, one process: pretraining twice from the same seed gives the same metrics (the chain-wide
    comparison across processes is test_dvc_repro_after_sigkill_resumes_to_the_uninterrupted_result)."""
    from stages import run_stage

    runs = []
    for name in ("first", "second"):
        shutil.copytree(micro_chain, tmp_path / name, ignore=shutil.ignore_patterns("wandb", "outputs"))
        monkeypatch.chdir(tmp_path / name)
        runs.append(run_stage("pretrain", compose_micro("pretrain.max_steps=8", "pretrain.val_every=4")))
    same_metrics(*runs)
    assert runs[0]["val_loss"] == runs[1]["val_loss"]  # bit for bit, not only within tolerance


@pytest.mark.parametrize("kind", ["shuffled", "length_grouped", "draws"])
def test_samplers_resume_after_the_trained_batches_and_split_global_batches_over_ranks(kind):
    from pipeline.data.datamodules import DrawSampler, LengthGroupedSampler, ShuffledSampler

    lengths = [(i * 37) % 90 + 5 for i in range(101)]

    def sampler(batch: int, rank: int = 0, world: int = 1):
        if kind == "shuffled":
            return ShuffledSampler(len(lengths), batch, seed=5, rank=rank, world_size=world)
        if kind == "length_grouped":
            return LengthGroupedSampler(lengths, batch, seed=5, group=2, rank=rank, world_size=world)
        return DrawSampler(len(lengths), 60, batch, seed=5, rank=rank, world_size=world)  # 15 global batches

    epoch_3 = list(sampler(4).start(3, 0))
    assert epoch_3 != list(sampler(4).start(2, 0))  # every epoch its own order
    assert len(epoch_3) == len(sampler(4))
    resumed = sampler(4).start(3, 5)
    assert list(resumed) == epoch_3[5 * 4:]  # after 5 trained batches, the 6th comes next
    assert list(resumed) == epoch_3  # the skip applies to the resumed epoch only
    # two ranks x batch 2 share the global batches of one process x batch 4, half each
    ranks = [list(sampler(2, r, 2).start(3, 0)) for r in (0, 1)]
    merged = [i for b in range(len(ranks[0]) // 2) for r in ranks for i in r[2 * b:2 * b + 2]]
    assert merged == epoch_3
