"""The alignment methods by name: how to validate each one's config and how many policy updates it makes.

`policy_updates` is what the `sft_control` stage matches: SFT trained further for as many optimizer
steps as the configured method gave the policy, so that `evaluate` can tell alignment from more training.
Config only (no torch, no lightning): stage validation imports it, `evaluate` included; the objectives
themselves are `pipeline.objectives.ppo`, `.dpo` and `.grpo`.
"""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from pipeline.objectives.optim_config import validate_optim


def validate_ppo(cfg: DictConfig) -> None:
    for name in ("steps", "rollout_batch", "samples_per_prompt", "ppo_epochs", "minibatch_size", "max_new_tokens"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"align.{name} must be positive, got {cfg[name]}")
    if cfg.critic_warmup < 0 or not cfg.critic_lr > 0:
        raise ValueError("align.critic_warmup must be >= 0 and align.critic_lr positive")
    if cfg.minibatch_size > cfg.rollout_batch * cfg.samples_per_prompt:
        raise ValueError(f"align.minibatch_size ({cfg.minibatch_size}) must be <= align.rollout_batch x "
                         f"align.samples_per_prompt ({cfg.rollout_batch * cfg.samples_per_prompt})")
    ak = cfg.get("adaptive_kl") or {}
    if ak.get("target") is not None and not (ak["target"] > 0 and ak.get("horizon", 0) > 0):
        raise ValueError("align.adaptive_kl.target and align.adaptive_kl.horizon must be positive (target: null = fixed kl_coef)")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"align.kl_estimator {cfg.kl_estimator!r} is unknown: choose k1 or k3")
    if not cfg.temperature > 0:
        raise ValueError(f"align.temperature must be positive for PPO sampling, got {cfg.temperature}")
    if not (0 < cfg.cliprange < 1 and cfg.cliprange_value > 0):
        raise ValueError("align.cliprange must be in (0, 1) and align.cliprange_value positive")


def ppo_policy_updates(cfg: DictConfig) -> int:
    """Optimizer steps that move the policy (the critic-only warmup iterations are not among them)."""
    return cfg.steps * cfg.ppo_epochs * -(-cfg.rollout_batch * cfg.samples_per_prompt // cfg.minibatch_size)


def validate_dpo(cfg: DictConfig) -> None:
    for name in ("steps", "batch_size"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"align.{name} must be positive, got {cfg[name]}")
    if not cfg.beta > 0:
        raise ValueError(f"align.beta must be positive, got {cfg.beta}: e.g. 0.1")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"align.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")


def dpo_policy_updates(cfg: DictConfig) -> int:
    return int(cfg.steps)


def validate_grpo(cfg: DictConfig) -> None:
    for name in ("steps", "rollout_batch", "group_size", "epochs", "minibatch_size", "max_new_tokens"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"align.{name} must be positive, got {cfg[name]}")
    if cfg.group_size < 2:
        raise ValueError(f"align.group_size must be >= 2 (advantages are relative to the group), got {cfg.group_size}")
    if cfg.minibatch_size > cfg.rollout_batch * cfg.group_size:
        raise ValueError(f"align.minibatch_size ({cfg.minibatch_size}) must be <= align.rollout_batch x "
                         f"align.group_size ({cfg.rollout_batch * cfg.group_size})")
    if not cfg.temperature > 0:
        raise ValueError(f"align.temperature must be positive for sampling, got {cfg.temperature}")
    if cfg.kl_coef < 0 or not 0 < cfg.cliprange < 1:
        raise ValueError("align.kl_coef must be >= 0 and align.cliprange in (0, 1)")


def grpo_policy_updates(cfg: DictConfig) -> int:
    return cfg.steps * cfg.epochs * -(-cfg.rollout_batch * cfg.group_size // cfg.minibatch_size)


_VALIDATE: dict[str, Callable[[DictConfig], None]] = {
    "ppo": validate_ppo, "dpo": validate_dpo, "grpo": validate_grpo,
}
_POLICY_UPDATES: dict[str, Callable[[DictConfig], int]] = {
    "ppo": ppo_policy_updates, "dpo": dpo_policy_updates, "grpo": grpo_policy_updates,
}
METHODS = tuple(_VALIDATE)


def validate_align(cfg: DictConfig) -> None:
    """Raise ValueError naming the field if `align` is not a valid config of a known method."""
    if cfg.get("method") not in METHODS:
        raise ValueError(f"align.method {cfg.get('method')!r} is unknown: choose one of {', '.join(METHODS)} "
                         "(align=<name>, files in conf/align/)")
    _VALIDATE[cfg.method](cfg)
    validate_optim(cfg.optim, "align")
    if not cfg.kl_bound > 0:
        raise ValueError(f"align.kl_bound must be positive, got {cfg.kl_bound}")


def policy_updates(cfg: DictConfig) -> int:
    """Optimizer steps the policy takes under `cfg` (PPO's critic-only warmup steps not counted)."""
    return int(_POLICY_UPDATES[cfg.method](cfg))
