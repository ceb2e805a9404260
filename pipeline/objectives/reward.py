"""Bradley-Terry reward model: the SFT backbone plus a scalar head read at the last real token.

P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the loss is -log of it (Ouyang et al.
2022). Metrics use TRL's names: accuracy (share of pairs ranked right), margin (mean r_c - r_r),
mean_reward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.model import GPT
from pipeline.objectives.base import Objective


class ScalarHead(nn.Module):
    """A GPT backbone read out to one number per sequence (reward model, PPO critic)."""

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def per_token(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A value for every position (B, T)."""
        return self.head(self.backbone.hidden(idx, attention_mask=attention_mask)).squeeze(-1)

    def forward(self, idx: torch.Tensor, last: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The value at index `last` of each row (B,)."""
        values = self.per_token(idx, attention_mask)
        return values.gather(1, last[:, None]).squeeze(1)


def pairwise_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = r_chosen - r_rejected
    return {"loss": -F.logsigmoid(margin).mean(), "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean(), "mean_reward": torch.cat([r_chosen, r_rejected]).mean()}


class RewardModeling(Objective):
    """Batches hold both sides of each pair: {"input_ids": (2B,T), "last": (2B,)}, chosen first."""

    def __init__(self, model: ScalarHead, optim: DictConfig, max_steps: int) -> None:
        super().__init__(optim, max_steps)
        self.model = model

    def _stats(self, batch: dict) -> dict[str, torch.Tensor]:
        r = self.model(batch["input_ids"], batch["last"])
        n = r.size(0) // 2
        return pairwise_stats(r[:n], r[n:])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = self._stats(batch)
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "accuracy"))
        self.log_throughput(int(batch["input_ids"].numel()))
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for k, v in self._stats(batch).items():
            self.log(f"val/{k}", v, prog_bar=k == "accuracy")
