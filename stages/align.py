"""Stage `align`: RLHF from the SFT checkpoint against the reward model (method = `align.method`)."""
from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt, save_checkpoint
from pipeline.context import DATA_DIR, checkpoint_meta, load_tokenizer, mean_of
from pipeline.data.datamodules import PromptData
from pipeline.objectives.base import validate_optim
from pipeline.objectives.ppo import PPO, validate_ppo
from pipeline.objectives.reward import load_reward_model
from pipeline.runner import main
from pipeline.train import fit

METHODS = ("ppo",)


def run(cfg: DictConfig) -> dict:
    a = cfg.align
    if a.method not in METHODS:
        raise ValueError(f"align.method {a.method!r} is unknown: choose one of {', '.join(METHODS)} (conf/align/)")
    validate_ppo(a)
    validate_optim(a.optim, "align")
    tok = load_tokenizer(cfg)
    policy, _ = load_gpt("sft", tok.sha256)
    reference, _ = load_gpt("sft", tok.sha256)
    reward_model = load_reward_model(policy.config, tok.sha256)
    # TRL's default: the critic starts as the reward model
    critic = load_reward_model(policy.config, tok.sha256).drop_likelihood_term()
    L.seed_everything(cfg.seed, verbose=False)
    module = PPO(policy.train(), reference, critic.train(), reward_model, tok, a, cfg.seed)
    data = PromptData(DATA_DIR, a.rollout_batch, a.steps + a.critic_warmup, cfg.seed)
    _, curves, _ = fit(module, data, cfg, "align", validate=False, max_epochs=1, log_every=1)
    rows = curves.train
    head, tail = rows[: max(1, len(rows) // 4)], rows[-max(1, len(rows) // 4):]
    metrics = {"method": a.method, "iterations": a.steps}
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
                "objective/response_length", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg"):
        metrics[f"{key}_first"] = mean_of(head, key)
        metrics[key] = mean_of(tail, key)
    save_checkpoint("aligned", policy, checkpoint_meta(cfg, tok, policy, "gpt", method=a.method, step=a.steps))
    return metrics


if __name__ == "__main__":
    main("align")
