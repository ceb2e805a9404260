"""Next-token language modeling: the pretraining objective, and SFT's with masked labels.

loss = mean over predicted positions of -log p(x_{t+1} | x_{<=t}); positions whose label is -100
(prompt tokens in SFT, padding) are skipped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.data.tokenizer import IGNORE_INDEX
from pipeline.model import GPT
from pipeline.objectives.base import Objective


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class LanguageModeling(Objective):
    """Trains `model` on batches {"input_ids": (B,T), "labels": (B,T)} with labels already shifted."""

    def __init__(self, model: GPT, optim: DictConfig, max_steps: int) -> None:
        super().__init__(optim, max_steps)
        self.model = model
        self.flops_per_token = model.flops_per_token()

    def step_loss(self, batch: dict) -> torch.Tensor:
        return lm_loss(self.model(batch["input_ids"]), batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss under DDP
        self.log_throughput((batch["labels"] != IGNORE_INDEX).sum(), batch_idx)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.step_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", math.e ** loss.clamp(max=20), sync_dist=True)
        tokens_per_byte = getattr(self.trainer.datamodule, "val_tokens_per_byte", None)
        if tokens_per_byte:  # bits per byte: comparable across tokenizers (nats/token -> bits/byte)
            self.log("val/bpb", loss / math.log(2) * tokens_per_byte, sync_dist=True)
