"""Stage `evaluate`: every checkpoint on the same eval prompts → metrics/evaluate.json {checkpoint: {metric: value}}.

Checkpoints: pretrain, sft, sft_control (SFT trained further for as many steps as alignment took) and
aligned (the configured method). The `verdict` entry answers the questions alignment is judged by:
did it beat SFT and the same-compute control on exact match, did KL to SFT stay under the method's
bound, and did the reward model's score rise while ground-truth accuracy fell (reward hacking)?
Each checkpoint's row names the run that trained it (`run_id`, from its meta.json); the verdict's
`run_id` is this evaluation's.
"""
from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt
from pipeline.config import run_id
from pipeline.context import DATA_DIR, load_tokenizer
from pipeline.data.prepare import MANIFEST_FILE, load_split
from pipeline.evaluation.metrics import PromptSet, evaluate_checkpoint
from pipeline.inference.prompting import FewShotPool, PromptTemplates
from pipeline.objectives.reward_model import load_reward_model
from pipeline.runner import main

CHECKPOINTS = ("pretrain", "sft", "sft_control", "aligned")


def verdict(results: dict[str, dict[str, float]], method: str, kl_bound: float) -> dict:
    """How `aligned` compares with `sft` and `sft_control` (1/0 flags, so DVC can show and diff them)."""
    a, s, c = results["aligned"], results["sft"], results["sft_control"]
    accuracy_fell = a["exact_match"] < s["exact_match"] or a["exact_match_sampled"] < s["exact_match_sampled"]
    return {
        "method": method,
        "exact_match_vs_sft": round(a["exact_match"] - s["exact_match"], 6),
        "exact_match_vs_control": round(a["exact_match"] - c["exact_match"], 6),
        "beats_sft": int(a["exact_match"] > s["exact_match"]),
        "beats_control": int(a["exact_match"] > c["exact_match"]),
        "kl_to_sft": a["kl_to_sft"], "kl_bound": float(kl_bound),
        "kl_within_bound": int(a["kl_to_sft"] <= kl_bound),
        "reward_hacking": int(a["reward"] > s["reward"] and accuracy_fell),
    }


def prompt_sets(cfg: DictConfig, tok, block_size: int) -> tuple[PromptSet, PromptSet]:
    """The eval and hard splits, each asked zero-shot, few-shot and step by step, as token prompts.

    Few-shot exemplars come from the SFT split; the chain-of-thought trigger is the one the prepared
    SFT data was written with (data/prepared/manifest.json), so evaluation asks the way training taught.
    """
    e = cfg.evaluate
    trigger = json.loads((DATA_DIR / MANIFEST_FILE).read_text())["config"]["cot"]["trigger"]
    templates = PromptTemplates.from_cfg(e.prompts, trigger)
    eval_rows = load_split(DATA_DIR, "eval")[: e.max_problems]
    hard_rows = load_split(DATA_DIR, "eval_hard")[: e.max_problems]
    pool = FewShotPool(load_split(DATA_DIR, "sft"), {r["key"] for r in eval_rows + hard_rows}, cfg.seed)
    room = block_size - e.max_new_tokens
    return (PromptSet.build(tok, templates, pool, eval_rows, room),
            PromptSet.build(tok, templates, pool, hard_rows, room))


def run(cfg: DictConfig) -> dict:
    e = cfg.evaluate
    if min(e.max_problems, e.batch_size, e.max_new_tokens, e.cot_max_new_tokens) <= 0:
        raise ValueError("evaluate.max_problems, batch_size, max_new_tokens and cot_max_new_tokens must be positive")
    tok = load_tokenizer(cfg)
    sft, _ = load_gpt("sft", tok.sha256)
    prompts, hard = prompt_sets(cfg, tok, sft.config.block_size)
    reward_model = load_reward_model(sft.config, tok.sha256).eval()
    results: dict[str, dict] = {}
    for name in CHECKPOINTS:
        model, meta = load_gpt(name, tok.sha256)
        torch.manual_seed(cfg.seed)
        results[name] = evaluate_checkpoint(model, tok, prompts, hard, reward_model, sft, e, cfg.seed)
        print(f"evaluate {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[name].items() if "/" not in k))
        results[name]["run_id"] = meta.get("run_id")  # the run that trained it: the code and config behind the row
    results["verdict"] = {**verdict(results, cfg.align.method, cfg.align.kl_bound), "run_id": run_id(cfg)}
    print("evaluate verdict: " + ", ".join(f"{k}={v}" for k, v in results["verdict"].items()))
    return results


if __name__ == "__main__":
    main("evaluate")
