"""Supervised finetuning: language modeling on chat conversations, loss on the assistant's tokens only.

The labels the SFT datamodule builds are IGNORE_INDEX on `<|bos|><|user|> question <|assistant|>`
and real on `answer <|end|>`, so the model learns to answer and to stop, not to imitate questions.
"""
from __future__ import annotations

import torch

from pipeline.data.tokenizer import IGNORE_INDEX
from pipeline.objectives.lm import LanguageModeling


class SupervisedFinetuning(LanguageModeling):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/answer_tokens", float((batch["labels"] != IGNORE_INDEX).sum()))
        return loss
