"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): unpaired examples, each only desirable or undesirable.

With r(x, y) = log pi(y | x) - log ref(y | x) (summed over the response's tokens) and z0 a reference point, the
loss on a desirable response is desirable_weight * (1 - sigmoid(beta (r - z0))) and on an undesirable one
undesirable_weight * (1 - sigmoid(beta (z0 - r))): a bounded value that saturates, where DPO's pair loss does not.

The data are DPO's (the preference split and its optional on-policy pairs, pipeline.alignment.preference), used
unpaired: every chosen response is a desirable example and every rejected one an undesirable example, and the loss
never compares a pair's two responses (a batch of B pairs is 2B examples; rewards/accuracies still compares them).

z0 estimates KL(pi || ref) as the paper does: the batch's mean log-ratio on mismatched examples, each response
after the prompt of the next pair in the batch (responses the loss does not push up or down), over every rank's
batch, clamped at 0 and without gradient. The batch's own responses would not do: the loss moves exactly those.
This costs a forward of the policy and one of the reference on the 2B mismatched rows, without gradient.
Logged as kl (TRL's name), beside TRL's rewards/chosen, rewards/rejected and rewards/margins.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from pipeline.alignment import preference
from pipeline.alignment.preference import PreferenceConfig, PreferenceObjective, fit_preference, halves
from pipeline.data.datamodules import PreferenceData
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import sequence_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.parallel import global_mean

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS: dict[str, str] = {}
SUMMARY = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/kl")  # unpaired: each kind alone
splits, updates_at, policy_updates = preference.splits, preference.updates_at, preference.policy_updates


class Config(PreferenceConfig):
    """KTO on the preference split's responses, unpaired, against the frozen SFT reference (conf/align/kto.yaml)."""

    method: Literal["kto"]
    desirable_weight: Annotated[float, Field(gt=0)] = 1.0
    """lambda_D: weight of a desirable example's loss."""
    undesirable_weight: Annotated[float, Field(gt=0)] = 1.0
    """lambda_U: weight of an undesirable example's loss (the paper keeps lambda_D n_D / lambda_U n_U in [1, 4/3];
    here n_D = n_U)."""
    beta: Annotated[float, Field(gt=0)] = 1.0
    """Scale of the log-ratios inside the sigmoid: how sharply the loss saturates (DPO's 1.0 here)."""
    packing: Literal[False] = False
    """Not for KTO: its reference point is estimated on mismatched rows that are laid out padded."""


class UnpairedData(PreferenceData):
    """PreferenceData whose batches also hold the mismatched rows z0 is estimated on: `kl_input_ids` and
    `kl_response_mask`, each row's response after the prompt of the next pair (the last pair's: the first's)."""

    def collate(self, pairs: list) -> dict:
        batch = super().collate(pairs)
        prompts = [ids[:n] for (ids, n), _ in pairs]

        def after(item: tuple[list[int], int], prompt: list[int]) -> tuple[list[int], int]:
            ids, n = item
            return (prompt + ids[n:])[:self.block_size], len(prompt)

        nxt = prompts[1:] + prompts[:1]
        mismatched = super().collate([(after(c, p), after(r, p)) for (c, r), p in zip(pairs, nxt)])
        return {**batch, "kl_input_ids": mismatched["input_ids"], "kl_response_mask": mismatched["response_mask"]}


def reference_point(kl_logratios: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """z0: the mean log-ratio on the mismatched rows of every rank (rows of `weight` 0 left out), at least 0."""
    return global_mean(kl_logratios.detach(), weight).clamp(min=0)


def kto_loss(policy_desirable: torch.Tensor, ref_desirable: torch.Tensor, policy_undesirable: torch.Tensor,
             ref_undesirable: torch.Tensor, kl: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """KTO's loss on each desirable and each undesirable example, from summed log-probs and z0 (`kl`), and the
    rewards beta * r: {"desirable", "undesirable", "chosen", "rejected"} (each as long as its examples)."""
    chosen = beta * (policy_desirable - ref_desirable)
    rejected = beta * (policy_undesirable - ref_undesirable)
    z0 = beta * kl
    return {"desirable": desirable_weight * (1 - torch.sigmoid(chosen - z0)),
            "undesirable": undesirable_weight * (1 - torch.sigmoid(z0 - rejected)),
            "chosen": chosen, "rejected": rejected}


class KTO(PreferenceObjective):
    """Trains `policy` on UnpairedData batches: the chosen rows desirable, the rejected rows undesirable."""

    cfg: Config

    def pair_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        logp_d, logp_u = halves(self.logprobs(self.policy, batch))
        with torch.no_grad():
            ref_d, ref_u = halves(self.logprobs(self.reference, batch))
            ids, mask = batch["kl_input_ids"], batch["kl_response_mask"]
            mismatched = sequence_logprobs(self.policy, ids, mask) - sequence_logprobs(self.reference, ids, mask)
            weight = batch.get("weight")  # validation: padding pairs weigh 0
            kl = reference_point(mismatched, None if weight is None else torch.cat([weight, weight]))
        out = kto_loss(logp_d, ref_d, logp_u, ref_u, kl, c.beta, c.desirable_weight, c.undesirable_weight)
        # the mean over pairs of the two examples' mean is the mean over the 2B examples
        return {"loss": (out["desirable"] + out["undesirable"]) / 2, "rewards/chosen": out["chosen"],
                "rewards/rejected": out["rejected"], "kl": kl.expand_as(logp_d),
                "logps/chosen": logp_d, "logps/rejected": logp_u}


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    return fit_preference(KTO(policy.train(), reference, acfg), cfg, spec, tok, callbacks, data_type=UnpairedData)
