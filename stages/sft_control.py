"""Stage `sft_control`: the SFT checkpoint trained further, for as many optimizer steps as `align` gives
the policy, on the SFT data and batch size. `evaluate` scores it beside `aligned`: if alignment beats
SFT but not this control, more training, not alignment, moved the number.

The SFT run is extended, not restarted: the steps continue at the learning rate SFT ended on
(`sft.optim.lr * min_lr_ratio`), constant, without a new warmup, since a fresh warmup to the peak
rate would shake the model and make the control look worse than more SFT really is.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.objectives.methods import policy_updates, validate_align
from pipeline.runner import main
from stages.sft import finetune


def run(cfg: DictConfig) -> dict:
    validate_align(cfg.align)
    steps = policy_updates(cfg.align)
    o = cfg.sft.optim
    extended = OmegaConf.merge(o, {"lr": o.lr * o.min_lr_ratio, "warmup_steps": 0, "min_lr_ratio": 1.0})
    metrics = finetune(cfg, "sft", "sft_control", steps, optim=extended, matches=cfg.align.method)
    return {"steps": steps, "matches": cfg.align.method, "lr": float(extended.lr), **metrics}


if __name__ == "__main__":
    main("sft_control")
