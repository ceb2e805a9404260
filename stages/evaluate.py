"""Stage `evaluate`: every checkpoint on the same eval prompts → metrics/evaluate.json {checkpoint: {metric: value}}."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt
from pipeline.context import DATA_DIR, load_tokenizer
from pipeline.data.prepare import load_split
from pipeline.evaluation.metrics import evaluate_checkpoint
from pipeline.objectives.reward import load_reward_model
from pipeline.runner import main

CHECKPOINTS = ("pretrain", "sft", "aligned")


def run(cfg: DictConfig) -> dict:
    e = cfg.evaluate
    if e.max_problems <= 0 or e.batch_size <= 0 or e.max_new_tokens <= 0:
        raise ValueError("evaluate.max_problems, batch_size and max_new_tokens must be positive")
    tok = load_tokenizer(cfg)
    eval_rows = load_split(DATA_DIR, "eval")[: e.max_problems]
    hard_rows = load_split(DATA_DIR, "eval_hard")[: e.max_problems]
    sft, _ = load_gpt("sft", tok.sha256)
    reward_model = load_reward_model(sft.config, tok.sha256).eval()
    results = {}
    for name in CHECKPOINTS:
        model, _ = load_gpt(name, tok.sha256)
        torch.manual_seed(cfg.seed)
        results[name] = evaluate_checkpoint(model, tok, eval_rows, hard_rows, reward_model, sft, e, cfg.seed)
        print(f"evaluate {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[name].items() if "/" not in k))
    return results


if __name__ == "__main__":
    main("evaluate")
