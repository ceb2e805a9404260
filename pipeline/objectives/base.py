"""What every objective shares: AdamW with decay on matrices only, warmup + cosine schedule, throughput.

Weight decay on 2-D weights (matmuls, embeddings) but not on biases and LayerNorm gains follows
GPT-2/nanoGPT. The schedule is a linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`
at `max_steps`.
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch
from omegaconf import DictConfig


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def validate_optim(optim: DictConfig, where: str) -> None:
    if not optim.lr > 0:
        raise ValueError(f"{where}.optim.lr must be positive, got {optim.lr}")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ValueError(f"{where}.optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    if optim.warmup_steps < 0 or optim.weight_decay < 0:
        raise ValueError(f"{where}.optim.warmup_steps and weight_decay must be >= 0")


class Objective(L.LightningModule):
    """Base: optimizer + schedule from an `optim` config subtree, and a tokens/s meter."""

    def __init__(self, optim: DictConfig, max_steps: int) -> None:
        super().__init__()
        self.optim_cfg = optim
        self.max_steps = max_steps
        self._last_time: float | None = None

    def configure_optimizers(self):
        o = self.optim_cfg
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups(self, o.weight_decay), lr=o.lr, betas=tuple(o.betas), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, self.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def log_throughput(self, n_tokens: int) -> None:
        """Log train/tokens_per_sec measured between consecutive training steps."""
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("train/tokens_per_sec", n_tokens / max(now - self._last_time, 1e-9), prog_bar=False)
        self._last_time = now
