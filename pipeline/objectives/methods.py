"""The alignment methods by name: how to validate each one's config and how many policy updates it makes.

`policy_updates` is what the `sft_control` stage matches: SFT trained further for as many optimizer
steps as the configured method gave the policy, so that `evaluate` can tell alignment from more training.
"""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from pipeline.objectives import dpo, grpo, ppo
from pipeline.objectives.base import validate_optim

_VALIDATE: dict[str, Callable[[DictConfig], None]] = {
    "ppo": ppo.validate_ppo, "dpo": dpo.validate_dpo, "grpo": grpo.validate_grpo,
}
_POLICY_UPDATES: dict[str, Callable[[DictConfig], int]] = {
    "ppo": ppo.policy_updates, "dpo": dpo.policy_updates, "grpo": grpo.policy_updates,
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
