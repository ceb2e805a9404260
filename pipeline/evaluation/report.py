"""The lifecycle report: one Markdown page a person can read at a glance.

Its header says what ran (git commit, config, the device each training stage used, wall time and
tokens per stage); figures show the training curves, exact match per checkpoint and prompting mode,
and the alignment run's reward and KL; then the evaluate table and every stage's key numbers.
`write_report` writes the page, its PNG figures and `accuracy.json` (the bars' data, a DVC plot).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.config.identity import run_identity
from pipeline.evaluation import figures
from pipeline.io import atomic_dir, write_json

if TYPE_CHECKING:
    from pipeline.config.root import Config

EVALUATE, ALIGN = "evaluate", "align"  # the stages whose metrics get a section and a figure of their own
TABLE_METRICS = ("val_loss", "perplexity", "exact_match", "exact_match_fewshot", "exact_match_cot",
                 "exact_match_hard", "exact_match_fewshot_hard", "exact_match_cot_hard", "fewshot_shots",
                 "exact_match_sampled", "reward", "reward_greedy", "kl_to_sft", "response_length", "eos_rate", "run_id")
# name in reports/figures/ -> what the report says it shows
FIGURES = {
    "loss_curves": "Training curves: loss per optimizer step for each training stage (train and validation); "
                   "for PPO, which has no single loss, the reward model's score.",
    "accuracy": "Exact match per checkpoint under zero-shot, few-shot and chain-of-thought prompting, "
                "on the eval split and on the harder split.",
    "alignment": ("Alignment: the reward and the KL to the SFT reference over the run's steps, and the "
                  "monitor's held-out exact match against the reward model's score (align.eval_every)."),
}


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def evaluate_table(results: dict[str, dict[str, float]]) -> list[str]:
    names = [n for n in results if n != "verdict"]
    families = sorted({k for r in results.values() for k in r if k.startswith("exact_match/")})
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in (*TABLE_METRICS, *families):
        lines.append(f"| {key} | " + " | ".join(fmt(results[n].get(key, "")) for n in names) + " |")
    return lines


def verdict_lines(v: dict | None) -> list[str]:
    if not v:
        return []
    yes = {1: "yes", 0: "no"}
    return [
        f"**Alignment ({v['method']})**: exact match {v['exact_match_vs_sft']:+.4f} vs SFT, "
        f"{v['exact_match_vs_control']:+.4f} vs the same-compute SFT control; beats SFT: {yes[v['beats_sft']]}, "
        f"beats control: {yes[v['beats_control']]}; KL to SFT {v['kl_to_sft']:.3g} (bound {v['kl_bound']:.3g}, "
        f"within: {yes[v['kl_within_bound']]}); reward hacking: {yes[v['reward_hacking']]}.", "",
    ]


def load_stages(metrics_dir: Path, order: list[str]) -> dict[str, dict]:
    """{stage: its metrics} for every stage of `order` that wrote metrics/<stage>.json; evaluate's is required."""
    stages = {s: json.loads((metrics_dir / f"{s}.json").read_text())
              for s in order if (metrics_dir / f"{s}.json").is_file()}
    if EVALUATE not in stages:
        raise FileNotFoundError(f"{metrics_dir}/evaluate.json not found: run the evaluate stage first "
                                "(dvc repro evaluate)")
    return stages


def stage_table(stages: dict[str, dict]) -> list[str]:
    """Per stage: the run that produced its outputs, the device it trained on, wall time, tokens trained
    on and tokens per wall-clock second."""
    lines = ["| stage | run | device | wall time (s) | tokens | tokens/s |", "|---|---|---|---:|---:|---:|"]
    for stage, m in stages.items():
        if stage == EVALUATE:  # its metrics are the per-checkpoint table, not one stage's numbers
            continue
        wall, tokens = m.get("wall_time_s"), m.get("tokens", m.get("tokens_seen"))
        rate = f"{tokens / wall:,.0f}" if tokens and wall else ""
        wall_cell, tokens_cell = fmt(wall) if wall is not None else "", f"{tokens:,}" if tokens is not None else ""
        cells = [stage, m.get("run_id", ""), m.get("device", ""), wall_cell, tokens_cell, rate]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def iteration_lines(align: dict) -> list[str]:
    """Where an online method's iterations spend their time (it logs time/generation_s and time/training_s)."""
    if "generation_share" not in align:
        return []
    return [f"Each `{align.get('method', '')}` iteration spent {fmt(align['generation_s_per_iteration'])} s "
            f"generating (sampling and scoring its rollout) and {fmt(align['training_s_per_iteration'])} s training "
            f"on it: generation took {align['generation_share']:.0%} of the time (per iteration in W&B: "
            "`time/generation_s`, `time/training_s`).", ""]


def render(cfg: Config, stages: dict[str, dict], run: dict, figure_names: list[str] | tuple[str, ...] = ()) -> str:
    """The report's Markdown; `run` is the run identity (pipeline.config.identity.run_identity),
    `figure_names` the PNGs written to reports/figures/ (linked relatively)."""
    choices = {"strategy": cfg.strategy.name, "logger": ", ".join(cfg.logger.names()) or "none"}
    m = cfg.model
    code = " with uncommitted code changes" if run["git_dirty"] else ""
    experiment = f", DVC experiment `{run['dvc_experiment']}`" if run["dvc_experiment"] else ""
    lines = [
        "# GPT lifecycle report", "",
        f"- run: `{run['run_id']}`, git commit `{run['git_commit'][:12]}`{code}{experiment}, config hash "
        f"`{run['config_hash']}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- model: {m.n_layer} layers x {m.n_head} heads x {m.n_embd} wide, block {m.block_size}, "
        f"{m.pos_encoding} positions; trainer `{cfg.trainer.accelerator}` ({cfg.trainer.precision}, "
        f"devices {cfg.trainer.devices}), strategy `{choices['strategy']}`, logger `{choices['logger']}`, "
        f"align `{cfg.align.method}`", "",
        *stage_table(stages), "",
        "`run`: the pipeline run that produced the stage's outputs (`run-<git commit>-<config hash>`; a stage "
        "DVC found up to date keeps the run that last produced it). Checkpoints, W&B runs (their group) and "
        "W&B artifacts carry the same id.", "",
        "`tokens`: the tokens of every training batch, as each objective counts them for its throughput "
        "(pretraining every position, SFT the answer tokens its loss is on, reward model and DPO the real "
        "tokens of the pair batches, padding not counted, PPO and GRPO the prompt and sampled tokens of each rollout); "
        "`tokens/s` divides them by the stage's whole wall time (loading and saving included).", "",
        *iteration_lines(stages.get(ALIGN, {})),
    ]
    if figure_names:
        lines += ["## Figures", ""]
        for name in figure_names:
            lines += [f"![{name.replace('_', ' ')}](figures/{name}.png)", "", f"*{FIGURES[name]}*", ""]
        missing = missing_modes(stages[EVALUATE])
        if missing:
            lines += [f"Not measured by evaluate, so not drawn: {', '.join(missing)}.", ""]
    lines += [
        "## Evaluation: every checkpoint on the same eval prompts", "",
        *evaluate_table(stages[EVALUATE]), "",
        "`exact_match`: greedy answer to the bare question (zero-shot), checked strictly by the generator's "
        "checker; `_fewshot`: the same after k solved training problems as earlier turns (`fewshot_shots` of "
        "them fit on average); `_cot`: asked to think step by step, graded on the answer after the reply's "
        "last `Answer:`; `_hard`: operands with more digits than any training problem; `reward` and `kl_to_sft` "
        "(nats per response) are measured on responses sampled at temperature 1, the two terms of the RLHF "
        "objective; `reward_greedy` scores the greedy answers. "
        "`sft_control` is SFT trained further for as many optimizer steps as alignment gave the weights it saved. "
        "`run_id`: the run that trained the checkpoint (its meta.json).",
        "", *verdict_lines(stages[EVALUATE].get("verdict")), "## Stages", "",
    ]
    for stage, vals in stages.items():
        if stage == EVALUATE:
            continue
        lines.append(f"### {stage}")
        lines.append("")
        lines += [f"- {k}: {fmt(v)}" for k, v in vals.items()]
        lines.append("")
    return "\n".join(lines)


def missing_modes(results: dict[str, dict]) -> list[str]:
    """"<prompting> (<split>)" for each prompting mode and split that no checkpoint has a number for."""
    return [f"{mode} ({split})" for split, suffix in figures.SPLITS.items() for mode, key in figures.PROMPTING.items()
            if not any(isinstance(r, dict) and r.get(key + suffix) is not None for r in results.values())]


def write_report(cfg: Config, metrics_dir: Path, reports_dir: Path, order: list[str], trained: list[str],
                 live_root: Path = paths.LIVE) -> dict:
    """reports_dir/report.md, its figures in reports_dir/figures/ and reports_dir/accuracy.json, from the
    metrics of the stages in `order` (the chain's) and the curves DVCLive wrote under `live_root` for those in
    `trained`."""
    stages = load_stages(metrics_dir, order)
    curves = figures.load_curves(live_root, trained)
    results = {k: v for k, v in stages[EVALUATE].items() if k != "verdict"}
    drawn = {"loss_curves": figures.loss_curves(curves, trained), "accuracy": figures.accuracy(results)}
    if curves.get(f"{ALIGN}_train"):
        drawn["alignment"] = figures.alignment(curves[f"{ALIGN}_train"], stages.get(ALIGN, {}).get("method", ""))
    with atomic_dir(reports_dir / "figures") as tmp:  # no figure of an earlier run stays behind
        for name, fig in drawn.items():
            figures.save(fig, tmp / f"{name}.png")
    write_json(reports_dir / "accuracy.json", figures.accuracy_rows(results))
    run = run_identity(cfg)
    text = render(cfg, stages, run, list(drawn))
    report = reports_dir / "report.md"
    tmp = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, report)
    return {"report_lines": text.count("\n") + 1, "figures": len(drawn), "git_commit": run["git_commit"]}
