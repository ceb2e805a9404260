"""Checks on an `optim` config subtree (lr, min_lr_ratio, warmup_steps, weight_decay), the one every
objective's optimizer and schedule (`pipeline.objectives.base.Objective`) read.

Config only (no torch, no lightning): stage validation imports it before any training code.
"""
from __future__ import annotations

from omegaconf import DictConfig


def validate_optim(optim: DictConfig, where: str) -> None:
    if not optim.lr > 0:
        raise ValueError(f"{where}.optim.lr must be positive, got {optim.lr}")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ValueError(f"{where}.optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    if optim.warmup_steps < 0 or optim.weight_decay < 0:
        raise ValueError(f"{where}.optim.warmup_steps and weight_decay must be >= 0")
