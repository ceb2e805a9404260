"""The report stage on the repo's real metrics and curves (dvclive/), plus an evaluate.json with every prompting mode:
header table, figures (valid PNGs that plot the right numbers), the accuracy data DVC plots, clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread

from pipeline.evaluation import figures
from stages import registry

from conftest import REPO, compose_micro

CHECKPOINTS = [c.name for c in registry().checkpoints("gpt")]
MODES = {"exact_match": 0.1, "exact_match_fewshot": 0.2, "exact_match_cot": 0.3}
DEVICE = "cpu (x86_64, 2 threads)"


def synthetic_evaluate() -> dict:
    """The committed table with all six exact-match keys: distinct numbers per checkpoint, mode and split."""
    table = json.loads((REPO / "metrics" / "evaluate.json").read_text())
    for i, ckpt in enumerate(CHECKPOINTS):
        for key, base in MODES.items():
            table[ckpt][key] = round(base + 0.1 * i, 4)
            table[ckpt][f"{key}_hard"] = round((base + 0.1 * i) / 2, 4)
    return table


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding a copy of metrics/ with device, tokens and a run id on the training stages."""
    shutil.copytree(REPO / "metrics", tmp_path / "metrics")
    shutil.copytree(REPO / "dvclive", tmp_path / "dvclive")  # the training stages' curves (DVCLive's step files)
    for i, stage in enumerate(registry().trained()):
        path = tmp_path / "metrics" / f"{stage}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "device": DEVICE, "tokens": 1000 * (i + 1),
                                    "run_id": f"run-{i}abcdef-0123abcd"}))
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(synthetic_evaluate()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_report() -> dict:
    from stages import run_stage
    return run_stage("report", compose_micro())


def test_header_has_run_device_wall_time_and_tokens_per_stage(workdir):
    run_report()
    report = Path("reports/report.md").read_text()
    sft = json.loads(Path("metrics/sft.json").read_text())
    assert "| stage | run | device | wall time (s) | tokens | tokens/s |" in report
    assert (f"| sft | {sft['run_id']} | {DEVICE} | {sft['wall_time_s']:.4g} | 2,000 | "
            f"{2000 / sft['wall_time_s']:,.0f} |") in report
    assert "align `ppo`" in report and "strategy `auto`" in report


def test_report_embeds_three_valid_pngs(workdir):
    assert run_report()["figures"] == 3
    report = Path("reports/report.md").read_text()
    for name in ("loss_curves", "accuracy", "alignment"):
        assert f"](figures/{name}.png)" in report, name
        path = Path("reports/figures") / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width, _ = imread(path).shape
        assert width >= 800 and height >= 300, (name, width, height)
    assert "Not measured" not in report


def test_figures_are_the_same_bytes_when_rerun(workdir):
    run_report()
    first = {p.name: p.read_bytes() for p in Path("reports/figures").iterdir()}
    run_report()
    assert first == {p.name: p.read_bytes() for p in Path("reports/figures").iterdir()}


def test_accuracy_bars_are_the_evaluate_numbers(workdir):
    table = synthetic_evaluate()
    fig = figures.accuracy({k: v for k, v in table.items() if k != "verdict"})
    eval_ax, hard_ax = fig.axes[:2]
    for ax, suffix in ((eval_ax, ""), (hard_ax, "_hard")):
        assert [c.get_label() for c in ax.containers] == ["zero-shot", "few-shot", "chain-of-thought"]
        for container, key in zip(ax.containers, MODES):
            heights = [bar.get_height() for bar in container]
            # one bar per checkpoint, in the order evaluate wrote them
            assert heights == [table[c][key + suffix] for c in table if c != "verdict"], (key, suffix)
        assert ax.get_ylabel() == "exact match" and ax.get_title()


def test_accuracy_data_for_dvc_has_one_row_per_bar(workdir):
    run_report()
    rows = json.loads(Path("reports/accuracy.json").read_text())
    assert len(rows) == len(CHECKPOINTS) * len(MODES) * 2
    row = next(r for r in rows if (r["checkpoint"], r["prompting"], r["split"]) == ("sft", "few-shot", "hard"))
    assert row["exact_match"] == synthetic_evaluate()["sft"]["exact_match_fewshot_hard"]


def test_modes_evaluate_did_not_measure_are_skipped_and_named(workdir):
    table = synthetic_evaluate()
    for ckpt in CHECKPOINTS:  # zero-shot only, as before evaluate measured the other modes
        for key in ("exact_match_fewshot", "exact_match_cot", "exact_match_fewshot_hard", "exact_match_cot_hard"):
            del table[ckpt][key]
    Path("metrics/evaluate.json").write_text(json.dumps(table))
    run_report()
    report = Path("reports/report.md").read_text()
    assert "Not measured by evaluate, so not drawn: few-shot (eval), chain-of-thought (eval)" in report
    rows = json.loads(Path("reports/accuracy.json").read_text())
    assert {r["prompting"] for r in rows} == {"zero-shot"}


def test_alignment_figure_plots_the_align_curve(workdir):
    rows = figures.load_curves(Path("dvclive"), ["align"])["align_train"]
    kl_steps = sorted(figures.read_steps(Path("dvclive/align/plots/metrics/train/kl.tsv")))
    assert [r["step"] for r in rows if "train/kl" in r] == kl_steps
    fig = figures.alignment(rows, "ppo")
    reward_ax, kl_ax, eval_ax, reward_twin = fig.axes  # the monitor's evaluations: exact match, RM score beside it
    for ax, key in ((reward_ax, "train/reward"), (kl_ax, "train/kl"), (eval_ax, "eval/exact_match"),
                    (reward_twin, "eval/reward")):
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [r["step"] for r in rows if key in r]
        assert list(line.get_ydata()) == [r[key] for r in rows if key in r]
    assert reward_ax.get_xlabel() == "step (iteration of an online method)"
    # a method that logs no KL (dpo) and ran no evaluations gets the reward panel alone
    assert len(figures.alignment([{"step": 1, "train/reward": 0.5}]).axes) == 1


def test_loss_curves_have_a_panel_per_training_stage(workdir):
    trained = registry().trained()
    fig = figures.loss_curves(figures.load_curves(Path("dvclive"), trained), trained)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == trained == ["pretrain", "sft", "reward", "align", "sft_control"]
    pretrain = fig.axes[0]
    steps = figures.read_steps(Path("dvclive/pretrain/plots/metrics/val/loss.tsv"))
    val = next(line for line in pretrain.get_lines() if line.get_label() == "val/loss")
    assert list(val.get_xdata()) == list(steps) and list(val.get_ydata()) == list(steps.values())


def test_missing_evaluate_names_the_stage_to_run(workdir):
    Path("metrics/evaluate.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"evaluate\.json not found: run the evaluate stage"):
        run_report()


def test_online_alignment_time_split_is_reported(workdir):
    """An online method's metrics carry its mean seconds per iteration generating and training: the report says
    them and the share."""
    path = Path("metrics/align.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "generation_s_per_iteration": 0.75,
                                "training_s_per_iteration": 0.25, "generation_share": 0.75}))
    run_report()
    report = Path("reports/report.md").read_text()
    assert "spent 0.75 s generating (sampling and scoring its rollout) and 0.25 s training" in report
    assert "generation took 75% of the time" in report
