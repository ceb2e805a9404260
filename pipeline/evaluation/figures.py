"""The report's figures: loss curves per training stage, exact match per checkpoint and prompting mode,
and the alignment run's reward and KL. One function per figure, each returning the `Figure`.

Figures are built without pyplot (no global state, no GUI backend) and saved as PNG without the
"Software" tag, so the same metrics give the same bytes.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

# prompting mode -> its exact-match key in metrics/evaluate.json on the eval split; the harder split adds "_hard"
PROMPTING = {"zero-shot": "exact_match", "few-shot": "exact_match_fewshot", "chain-of-thought": "exact_match_cot"}
SPLITS = {"eval": "", "hard": "_hard"}
# what a stage's panel shows: the first of these groups with a key the curves have
PANEL_KEYS = (("train/loss", "val/loss", "loss"), ("train/reward",))
KL_KEYS = ("train/kl", "objective/kl", "kl")


def read_steps(path: Path) -> dict[int, float]:
    """A DVCLive step file (a header, then `step<TAB>value` rows): {step: value}, a later row for a step winning."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return {int(row[0]): float(row[1]) for row in rows}


def load_curves(live_root: Path, stages: list[str]) -> dict[str, list[dict]]:
    """{"<stage>_<split>": rows of {"step": n, name: value}} from each of `stages`' DVCLive step files under
    `live_root` (dvclive/<stage>/plots/metrics/<name>.tsv): split `val` for the val/ scalars, `train` for the rest."""
    curves: dict[str, list[dict]] = {}
    for stage in stages:
        metrics_dir = live_root / stage / "plots" / "metrics"
        by_split: dict[str, dict[int, dict]] = {}
        for path in sorted(metrics_dir.rglob("*.tsv")):
            name = path.relative_to(metrics_dir).with_suffix("").as_posix()
            rows = by_split.setdefault("val" if name.startswith("val/") else "train", {})
            for step, value in read_steps(path).items():
                rows.setdefault(step, {"step": step})[name] = value
        for split, rows in by_split.items():
            curves[f"{stage}_{split}"] = [rows[s] for s in sorted(rows)]
    return curves


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` over the rows that logged it."""
    kept = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def _plot_stage(ax: Axes, stage: str, curves: dict[str, list[dict]]) -> None:
    runs = {split: curves.get(f"{stage}_{split}", []) for split in ("train", "val")}
    for keys in PANEL_KEYS:
        found = [(split, k) for k in keys for split, rows in runs.items() if any(k in r for r in rows)]
        if found:
            break
    for split, key in found:
        steps, values = series(runs[split], key)
        ax.plot(steps, values, marker="o" if split == "val" else None, markersize=3, label=key)
    is_loss = bool(found) and found[0][1] != "train/reward"
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if is_loss and values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")  # the first steps' loss would flatten the rest of the curve
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(("loss" if is_loss else "reward") + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def loss_curves(curves: dict[str, list[dict]], trained: list[str]) -> Figure:
    """One panel per stage of `trained` (the chain's training stages) that wrote curves: its loss (train and
    validation) over steps."""
    stages = [s for s in trained if curves.get(f"{s}_train") or curves.get(f"{s}_val")]
    if not stages:
        raise FileNotFoundError("no training curves in dvclive/: run the training stages first (dvc repro)")
    cols = min(3, len(stages))
    rows = -(-len(stages) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, stage in zip(axes, stages):
        _plot_stage(ax, stage, curves)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    fig.suptitle("Training curves per stage (train: every logged step; val: markers)")
    return fig


def accuracy_rows(results: dict[str, dict]) -> list[dict]:
    """One row per checkpoint x prompting mode x split that metrics/evaluate.json has a number for
    (checkpoints in the order evaluate wrote them)."""
    return [{"checkpoint": ckpt, "prompting": mode, "split": split, "label": f"{ckpt} / {mode} / {split}",
             "exact_match": results[ckpt][key + suffix]}
            for split, suffix in SPLITS.items() for ckpt in results
            for mode, key in PROMPTING.items() if results[ckpt].get(key + suffix) is not None]


def accuracy(results: dict[str, dict]) -> Figure:
    """Grouped bars: exact match of each checkpoint under each prompting mode, on the eval and the hard split.
    A mode the evaluation did not measure gets no bar."""
    rows = accuracy_rows(results)
    checkpoints = list(results)
    width = 0.8 / len(PROMPTING)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    for ax, split in zip(fig.subplots(1, len(SPLITS), sharey=True), SPLITS):
        for i, mode in enumerate(PROMPTING):
            got = {r["checkpoint"]: r["exact_match"] for r in rows if r["split"] == split and r["prompting"] == mode}
            if not got:
                continue
            xs = [checkpoints.index(c) + (i - (len(PROMPTING) - 1) / 2) * width for c in got]
            bars = ax.bar(xs, list(got.values()), width, label=mode, color=f"C{i}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(checkpoints)), checkpoints)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("exact match")
        ax.set_title(f"{split} split" + (" (more digits than training)" if split == "hard" else ""))
        ax.grid(axis="y", alpha=0.3)
        if ax.containers:
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Exact match per checkpoint and prompting mode")
    return fig


def alignment(rows: list[dict], method: str = "") -> Figure:
    """The alignment run's reward and KL to the reference policy over its iterations (what the method logged), and,
    when the monitor evaluated it (align.eval_every), held-out exact match against the reward model's score."""
    panels = [(k, "reward", "reward") for k in ("train/reward",) if any(k in r for r in rows)]
    panels += [(k, "KL to the reference", "KL (nats)") for k in KL_KEYS if any(k in r for r in rows)][:1]
    panels += [(k, "held out: exact match and RM score", "exact match") for k in ("eval/exact_match",)
               if any(k in r for r in rows)]
    if not panels:
        raise ValueError("dvclive/align/plots/metrics/ has no train/reward or KL step file: rerun the align stage")
    fig = Figure(figsize=(5 * len(panels), 3.2), layout="constrained")
    for ax, (key, title, unit) in zip(fig.subplots(1, len(panels), squeeze=False).ravel(), panels):
        steps, values = series(rows, key)
        ax.plot(steps, values, color="C2" if "kl" in key else "C0" if key.startswith("eval/") else "C1", label=key,
                marker="o" if key.startswith("eval/") else None)
        if key == "eval/exact_match":  # the proxy on its own axis: the two diverging is reward hacking
            twin = ax.twinx()
            twin.plot(*series(rows, "eval/reward"), color="C3", marker="s", label="eval/reward")
            twin.set_ylabel("RM score")
            twin.legend(fontsize=8, loc="lower right")
        ax.set_title(title)
        ax.set_xlabel("step (iteration of an online method)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Alignment{f' ({method})' if method else ''}: reward and KL to the SFT reference")
    return fig


def save(fig: Figure, path: Path) -> None:
    """PNG at report width, with no metadata that changes between runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
