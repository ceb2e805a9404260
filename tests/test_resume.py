"""Reliability of training: SIGKILL mid-run and resume, NaN stops with the last good checkpoint,
determinism, the resumable samplers behind exact resumption, and the resume settings: `resume.keep`,
`resume.ckpt_path` (a kept checkpoint, or `last`: a finished run continued), a finished run not resumed by a
plain rerun. (SLURM's requeue: test_requeue.py.)

The kills happen in the session fixture `micro_repo` (conftest): its `dvc repro` of the micro chain is
SIGKILLed in pretrain and in align and rerun, and must end where the uninterrupted in-process chain
(`micro_chain`) ends.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline.evaluation.figures import read_steps
from pipeline.io import file_sha256

from conftest import KILLS, compose_micro, seeded_workspace
from wandb_records import run_info

TIMING = {"wall_time_s", "eval_s", "eval_share", "tokens_per_sec", "mfu", "generation_s_per_iteration",
          "training_s_per_iteration", "generation_share"}  # measured, not computed: differ between any two runs
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
    # done: the final state stays (resume.ckpt_path=last), marked so that a plain rerun does not resume it
    state = json.loads((micro_repo / "outputs" / "resume" / stage / "state.json").read_text())
    assert state["done"] and state["final"] and kill["step"] < state["step"], state


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


# ------------------------------------------------------------------ resume.keep, resume.ckpt_path, a finished run

KEEP = ("trainer.progress_bar=false", "resume.keep=3")  # micro sft: 6 steps, a checkpoint every 2: 2, 4, 6 kept
RESUME_SFT = Path("outputs/resume/sft")


def sft_run(work: Path, *overrides: str) -> tuple[dict, str]:
    """Run stage sft in `work` (in-process); its metrics and what it printed on stderr."""
    from stages import run_stage

    err = io.StringIO()
    with contextlib.chdir(work), contextlib.redirect_stderr(err):
        metrics = run_stage("sft", compose_micro(*KEEP, *overrides))
    return metrics, err.getvalue()


def sft_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "artifacts" / "sft" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workspace where micro sft ran to the end with resume.keep=3 (its resume directory kept)."""
    work = seeded_workspace(tmp_path_factory.mktemp("finished"), "trainer.progress_bar=false")
    sft_run(work)
    return work


@pytest.fixture
def counted_steps(monkeypatch) -> list[int]:
    """The training steps this process runs from now on (one entry per SFT training batch)."""
    from pipeline.training.lm import SupervisedFinetuning

    steps: list[int] = []
    healthy = SupervisedFinetuning.training_step

    def counting(self, batch, batch_idx):
        steps.append(self.global_step)
        return healthy(self, batch, batch_idx)

    monkeypatch.setattr(SupervisedFinetuning, "training_step", counting)
    return steps


def copy_of(work: Path, dest: Path) -> Path:
    shutil.copytree(work, dest, ignore=shutil.ignore_patterns("wandb"))
    return dest


def test_resume_keep_keeps_the_newest_k_checkpoints_and_the_state_names_the_newest(finished):
    state = json.loads((finished / RESUME_SFT / "state.json").read_text())
    files = sorted(p.name for p in (finished / RESUME_SFT).glob("step-*.ckpt"))
    assert files == ["step-00000002.ckpt", "step-00000004.ckpt", "step-00000006.ckpt"]  # K = 3, the newest
    assert (state["checkpoint"], state["step"], state["final"], state["done"]) == ("step-00000006.ckpt", 6, True, True)
    assert [e["checkpoint"] for e in state["kept"]] == files
    assert all(file_sha256(finished / RESUME_SFT / e["checkpoint"]) == e["sha256"] for e in state["kept"])
    assert state["sha256"] == state["kept"][-1]["sha256"]


def test_resume_ckpt_path_continues_from_an_older_kept_checkpoint(finished, tmp_path, counted_steps):
    """From step 2 of the finished run: 4 more steps, and the weights of the uninterrupted run."""
    work = copy_of(finished, tmp_path / "from_step_2")
    metrics, err = sft_run(work, f"resume.ckpt_path={RESUME_SFT / 'step-00000002.ckpt'}")
    assert f"resuming sft from {RESUME_SFT / 'step-00000002.ckpt'} (step 2," in err, err
    assert counted_steps == [2, 3, 4, 5]
    for key, w in sft_weights(finished).items():
        torch.testing.assert_close(sft_weights(work)[key], w, atol=1e-6, rtol=0)
    same_metrics(metrics, json.loads((finished / "metrics" / "sft.json").read_text()))
    state = json.loads((work / RESUME_SFT / "state.json").read_text())
    assert [e["step"] for e in state["kept"]] == [2, 4, 6] and state["step"] == 6


def test_resume_ckpt_path_last_continues_a_finished_run_with_raised_max_steps(finished, tmp_path, counted_steps):
    """sft.max_steps 6 -> 10 with resume.ckpt_path=last: steps 7-10 only, on the curves and token count of the
    first 6 (those of a fresh 10-step run: the data order does not depend on the LR schedule)."""
    work = copy_of(finished, tmp_path / "continued")
    metrics, err = sft_run(work, "sft.max_steps=10", "resume.ckpt_path=last")
    assert f"resuming sft from {RESUME_SFT / 'step-00000006.ckpt'} (step 6," in err and "final state" in err, err
    assert counted_steps == [6, 7, 8, 9]
    state = json.loads((work / RESUME_SFT / "state.json").read_text())
    assert (state["step"], state["final"], [e["step"] for e in state["kept"]]) == (10, True, [6, 8, 10])
    assert json.loads((work / "artifacts" / "sft" / "meta.json").read_text())["step"] == 10
    fresh = copy_of(finished, tmp_path / "fresh")
    shutil.rmtree(fresh / "outputs")
    fresh_metrics, _ = sft_run(fresh, "sft.max_steps=10")
    # DVCLive's files continued: the steps the continued run logged follow the first run's, as in one run (Lightning
    # logs a step's scalars under the number of steps done before it: 9 is the 10th)
    curve = list(read_steps(work / "dvclive/sft/plots/metrics/train/loss.tsv"))
    assert curve == list(read_steps(fresh / "dvclive/sft/plots/metrics/train/loss.tsv"))
    assert curve[-1] == 9 and metrics["tokens"] == fresh_metrics["tokens"] > 0
    assert metrics["first_train_loss"] == fresh_metrics["first_train_loss"]
    assert metrics["val_loss"] < json.loads((finished / "metrics" / "sft.json").read_text())["val_loss"]


def test_a_plain_rerun_after_a_finished_run_starts_over(finished, tmp_path, counted_steps):
    """`auto` resumes a killed run only: the same config again (dvc repro -f) trains all 6 steps anew."""
    work = copy_of(finished, tmp_path / "again")
    metrics, err = sft_run(work)
    assert "starting sft" in err and "resuming" not in err, err
    assert counted_steps == list(range(6))
    same_metrics(metrics, json.loads((finished / "metrics" / "sft.json").read_text()))


def test_a_run_killed_after_its_final_checkpoint_resumes_to_its_outputs(finished, tmp_path, counted_steps):
    """Killed after the final state was committed but before its outputs (not done): the rerun trains nothing
    and reports the finished run's metrics, totals included."""
    work = copy_of(finished, tmp_path / "killed_at_the_end")
    state = work / RESUME_SFT / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "done": False}))
    metrics, err = sft_run(work)
    assert f"resuming sft from {RESUME_SFT / 'step-00000006.ckpt'} (step 6," in err, err
    assert counted_steps == []
    same_metrics(metrics, json.loads((finished / "metrics" / "sft.json").read_text()))


class Foreign:  # what a checkpoint of plain tensors and data must not hold
    pass


@pytest.mark.parametrize("case", ["missing", "foreign", "damaged"])
def test_a_bad_resume_ckpt_path_stops_the_stage_before_work(finished, tmp_path, counted_steps, case, capsys):
    from pipeline.harness.runner import exit_codes

    work = copy_of(finished, tmp_path / case)
    for out in ("artifacts/sft", "metrics/sft.json", "dvclive/sft"):
        shutil.rmtree(work / out) if (work / out).is_dir() else (work / out).unlink()
    bad = Path("outputs") / f"{case}.ckpt"
    if case == "foreign":
        torch.save({"state_dict": {}, "extra": Foreign()}, work / bad)
    elif case == "damaged":
        (work / bad).write_bytes(b"not a checkpoint")
    state = (work / RESUME_SFT / "state.json").read_bytes()
    with pytest.raises(SystemExit) as stop, exit_codes("sft"):
        sft_run(work, f"resume.ckpt_path={bad}")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    why = "does not exist" if case == "missing" else "does not load as plain tensors and data"
    assert f"resume.ckpt_path: {bad} {why}" in err and "resume.ckpt_path=last" in err, err
    assert counted_steps == []
    assert not any((work / p).exists() for p in ("artifacts/sft", "metrics/sft.json", "dvclive/sft"))
    assert (work / RESUME_SFT / "state.json").read_bytes() == state


@pytest.mark.parametrize(("overrides", "message"), [
    (("resume.ckpt_path=''",), "resume.ckpt_path is empty: give it a value, or null (e.g. resume.ckpt_path=last)"),
    (("resume.ckpt_path=last", "resume.mode=never"), "resume.ckpt_path is last but resume.mode is never"),
    (("resume.keep=0",), "resume.keep is 0: it must be >= 1"),
])
def test_wrong_resume_settings_are_refused_naming_the_field(overrides, message):
    from pipeline.config.schema import ConfigError

    from conftest import micro_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        micro_config(*overrides)
