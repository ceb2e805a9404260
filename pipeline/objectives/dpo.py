"""Direct preference optimisation (Rafailov et al. 2023): the policy is its own reward model.

With pi the policy and ref the frozen SFT model, each response gets the implicit reward
    r(x, y) = beta * (log pi(y | x) - log ref(y | x))        (summed over the response's tokens)
and the loss on a pair is the Bradley-Terry loss on those rewards, -log sigmoid(r(chosen) - r(rejected)).
No sampling, no value model: one forward of the policy (and, once per batch, of the reference) per pair.

Pairs are the preference split (correct answer vs a plausible corruption) plus, optionally, on-policy
pairs: the SFT model's own wrong samples against the correct answer (`reward.on_policy_pairs`), so the
loss also pushes down the mistakes this policy actually makes.
Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.model import GPT
from pipeline.objectives.base import Objective
from pipeline.objectives.rollout import sequence_logprobs


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The sigmoid DPO loss per pair and the implicit rewards (all (B,)).

    `label_smoothing` > 0 is the conservative DPO of Mitchell (2023): the label is trusted with
    probability 1 - label_smoothing.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    logits = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return {"loss": loss, "chosen": chosen, "rejected": rejected}


class DPO(Objective):
    """Trains `policy` on preference batches (PreferenceData: chosen rows first, then rejected)."""

    def __init__(self, policy: GPT, reference: GPT, cfg: DictConfig) -> None:
        super().__init__(cfg.optim, cfg.steps)
        self.policy, self.reference, self.cfg = policy, reference, cfg
        reference.requires_grad_(False).eval()

    def configure_optimizers(self):
        self.reference.requires_grad_(False)  # keep the frozen copy out of the optimizer's groups
        return super().configure_optimizers()

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["response_mask"]
        half = ids.size(0) // 2
        logp = sequence_logprobs(self.policy, ids, mask)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, ids, mask)
        out = dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], self.cfg.beta, self.cfg.label_smoothing)
        loss = out["loss"].mean()
        self.log_dict({
            f"{prefix}/loss": loss,
            f"{prefix}/rewards/chosen": out["chosen"].mean(),
            f"{prefix}/rewards/rejected": out["rejected"].mean(),
            f"{prefix}/rewards/accuracies": (out["chosen"] > out["rejected"]).float().mean(),
            f"{prefix}/rewards/margins": (out["chosen"] - out["rejected"]).mean(),
            f"{prefix}/logps/chosen": logp[:half].mean(),
            f"{prefix}/logps/rejected": logp[half:].mean(),
        }, prog_bar=False, batch_size=half)
        if prefix == "train":
            self.log("train/reward", (out["chosen"] - out["rejected"]).mean(), prog_bar=True, batch_size=half)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_throughput(batch["input_ids"].numel(), batch_idx)
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")
