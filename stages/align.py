"""Stage `align`: preference/RL alignment of the SFT checkpoint; the method is the `align` config group.

ppo:  sample, score with the reward model, clipped policy + value updates (needs the reward stage).
dpo:  the sigmoid DPO loss on preference pairs against the frozen SFT reference.
grpo: group-sampled RL on the generator's checker (verifiable reward).
Each writes checkpoint `aligned` and `metrics/align.json` naming the method and its policy updates.
"""
from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt, save_checkpoint
from pipeline.context import DATA_DIR, checkpoint_meta, load_tokenizer, mean_of
from pipeline.data.datamodules import PreferenceData, PromptData
from pipeline.data.prepare import load_split
from pipeline.model import GPT
from pipeline.objectives.methods import policy_updates, validate_align
from pipeline.runner import main
from pipeline.train import fit


def _first_last(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Each key's mean over the first and the last quarter of the logged iterations."""
    n = max(1, len(rows) // 4)
    out: dict[str, float | None] = {}
    for key in keys:
        out[f"{key}_first"] = mean_of(rows[:n], key)
        out[key] = mean_of(rows[-n:], key)
    return out


def _ppo(cfg: DictConfig, policy: GPT, reference: GPT, tok) -> dict:
    from pipeline.objectives.ppo import PPO
    from pipeline.objectives.reward_model import load_reward_model

    a = cfg.align
    reward_model = load_reward_model(policy.config, tok.sha256)
    # TRL's default: the critic starts as the reward model
    critic = load_reward_model(policy.config, tok.sha256).drop_likelihood_term()
    module = PPO(policy.train(), reference, critic.train(), reward_model, tok, a, cfg.seed)
    data = PromptData(DATA_DIR, a.rollout_batch, a.steps + a.critic_warmup, cfg.seed)
    _, curves, _ = fit(module, data, cfg, "align", validate=False, max_epochs=1, log_every=1,
                      single_device=True)
    return {"iterations": a.steps, **_first_last(curves.train, (
        "objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
        "objective/response_length", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg")), **curves.totals}


def _dpo(cfg: DictConfig, policy: GPT, reference: GPT, tok) -> dict:
    from pipeline.objectives.dpo import DPO
    from pipeline.objectives.reward_model import on_policy_pairs

    a = cfg.align
    op = a.on_policy
    extra = on_policy_pairs(policy.eval(), tok, load_split(DATA_DIR, "rl_prompts")[:op.prompts], op.samples,
                            op.max_new_tokens, op.temperature, cfg.seed) if op.prompts else []
    data = PreferenceData(DATA_DIR, tok, policy.config.block_size, a.batch_size, cfg.seed, a.val_fraction, extra)
    module = DPO(policy.train(), reference, a)
    _, curves, final = fit(module, data, cfg, "align", max_steps=a.steps, val_every=a.val_every,
                           val_batches=a.val_batches, grad_clip=a.grad_clip, single_device=True)
    return {"on_policy_pairs": len(extra), "held_out_pairs": len(data.val_rows),
            **{k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")},
            **_first_last(curves.train, ("train/loss", "train/rewards/margins", "train/rewards/accuracies")),
            **curves.totals}


def _grpo(cfg: DictConfig, policy: GPT, reference: GPT, tok) -> dict:
    from pipeline.objectives.grpo import GRPO

    a = cfg.align
    module = GRPO(policy.train(), reference, tok, a, cfg.seed)
    data = PromptData(DATA_DIR, a.rollout_batch, a.steps, cfg.seed)
    _, curves, _ = fit(module, data, cfg, "align", validate=False, max_epochs=1, log_every=1,
                      single_device=True)
    return {"iterations": a.steps, **_first_last(curves.train, (
        "reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio", "entropy", "completions/mean_length")),
        **curves.totals}


TRAIN = {"ppo": _ppo, "dpo": _dpo, "grpo": _grpo}


def run(cfg: DictConfig) -> dict:
    a = cfg.align
    validate_align(a)
    tok = load_tokenizer(cfg)
    policy, _ = load_gpt("sft", tok.sha256)
    reference, _ = load_gpt("sft", tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    metrics = {"method": a.method, "policy_updates": policy_updates(a), **TRAIN[a.method](cfg, policy, reference, tok)}
    save_checkpoint("aligned", policy, checkpoint_meta(cfg, tok, policy, "gpt", method=a.method,
                                                       step=metrics["policy_updates"]))
    return metrics


if __name__ == "__main__":
    main("align")
