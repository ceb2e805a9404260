"""The reward model's training objective: Bradley-Terry loss on preference pairs, TRL's metric names.

The model (`ScalarHead`), the pairwise statistics and on-policy pairs are in
`pipeline.objectives.reward_model`.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline.objectives.base import Objective
from pipeline.objectives.reward_model import ScalarHead, pairwise_stats


class RewardModeling(Objective):
    """Batches hold both sides of each pair, chosen first: input_ids (2B,T), last (2B,), response_mask (2B,T)."""

    def __init__(self, model: ScalarHead, optim: DictConfig, max_steps: int) -> None:
        super().__init__(optim, max_steps)
        self.model = model

    def _stats(self, batch: dict) -> dict[str, torch.Tensor]:
        r = self.model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"])
        n = r.size(0) // 2
        return pairwise_stats(r[:n], r[n:])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = self._stats(batch)
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "accuracy"))
        self.log_throughput(batch["input_ids"].numel(), batch_idx)
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for k, v in self._stats(batch).items():
            self.log(f"val/{k}", v, prog_bar=k == "accuracy")
