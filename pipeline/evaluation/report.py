"""The lifecycle report: one Markdown page with the evaluate table and every stage's key numbers."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import git_commit, run_group

STAGE_ORDER = ("prepare", "tokenizer", "pretrain", "sft", "reward", "align", "sft_control", "evaluate")
TABLE_METRICS = ("val_loss", "perplexity", "exact_match", "exact_match_hard", "exact_match_sampled", "reward",
                 "reward_greedy", "kl_to_sft", "response_length", "eos_rate")


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


def render(cfg: DictConfig, metrics_dir: Path) -> str:
    stages = {s: json.loads((metrics_dir / f"{s}.json").read_text())
              for s in STAGE_ORDER if (metrics_dir / f"{s}.json").is_file()}
    if "evaluate" not in stages:
        raise FileNotFoundError(f"{metrics_dir}/evaluate.json not found: run `dvc repro evaluate` first")
    choices = {g: cfg.get(g, {}).get("name", "") for g in ("strategy", "logger")}
    m = cfg.model
    lines = [
        "# GPT lifecycle report", "",
        f"- run: `{run_group(cfg)}`, git commit `{git_commit()[:12]}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- model: {m.n_layer} layers x {m.n_head} heads x {m.n_embd} wide, block {m.block_size}, "
        f"{m.pos_encoding} positions; trainer `{cfg.trainer.accelerator}` ({cfg.trainer.precision}), "
        f"strategy `{choices['strategy']}`, logger `{choices['logger']}`, align `{cfg.align.method}`",
        "- wall time per stage (s): " + ", ".join(f"{s} {fmt(v.get('wall_time_s', '?'))}"
                                                    for s, v in stages.items() if s != "evaluate"),
        "", "## Evaluation: every checkpoint on the same eval prompts", "",
        *evaluate_table(stages["evaluate"]), "",
        "`exact_match`: greedy answer checked by the generator's checker; `exact_match_hard`: operands with "
        "more digits than any training problem; `reward` and `kl_to_sft` (nats per response) are measured on "
        "responses sampled at temperature 1, the two terms of the RLHF objective; `reward_greedy` scores the greedy answers. "
        "`sft_control` is SFT trained further for as many optimizer steps as alignment gave the policy.",
        "", *verdict_lines(stages["evaluate"].get("verdict")), "## Stages", "",
    ]
    for stage, vals in stages.items():
        if stage == "evaluate":
            continue
        lines.append(f"### {stage}")
        lines.append("")
        lines += [f"- {k}: {fmt(v)}" for k, v in vals.items()]
        lines.append("")
    return "\n".join(lines)
