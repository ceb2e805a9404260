"""Direct preference optimisation (Rafailov et al. 2023): the policy is its own reward model, and its variants.

With pi the policy and ref the frozen SFT model, each response gets the implicit reward
    r(x, y) = beta * (log pi(y | x) - log ref(y | x))        (summed over the response's tokens)
and the loss on a pair is the Bradley-Terry loss on those rewards, -log sigmoid(r(chosen) - r(rejected)).
No sampling, no value model: one forward of the policy (and, once per batch, of the reference) per pair.
`loss_type` picks the loss on a pair (`label()` names the variant in reports):
- sigmoid (dpo): the loss above; with `label_smoothing` > 0 conservative DPO (cdpo, Mitchell 2023), the label
  trusted with probability 1 - label_smoothing.
- ipo (Azar et al. 2023): the squared loss (h - 1/(2 beta))^2 on h, the difference of the two log-ratios, which
  stops pulling once h reaches its target instead of pushing it to infinity. The log-ratios are summed over the
  response's tokens, as in the paper (TRL averages them per token); the target is per response.
- simpo (Meng et al. 2024): reference-free; the reward is beta times the average log-prob per response token and
  the loss -log sigmoid(r(chosen) - r(rejected) - simpo_gamma). Its rewards are on another scale: the paper's
  beta is ~2.0 (align.beta=2.0), not DPO's 1.0. The reference is never called.

Pairs are the preference split (correct answer vs a plausible corruption) plus, optionally, on-policy
pairs: the SFT model's own wrong samples against the correct answer (pipeline.alignment.preference).
Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pipeline.alignment import preference
from pipeline.alignment.preference import PreferenceConfig, PreferenceObjective, fit_preference, halves, response_tokens
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.training.curves import CurveRecorder

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS: dict[str, str] = {}
SUMMARY = ("train/loss", "train/rewards/margins", "train/rewards/accuracies")
splits, updates_at, policy_updates = preference.splits, preference.updates_at, preference.policy_updates


class Config(PreferenceConfig):
    """DPO on preference pairs against the frozen SFT reference (conf/align/dpo.yaml)."""

    method: Literal["dpo"]
    beta: Annotated[float, Field(gt=0)] = 1.0
    """Strength of the implicit KL to the reference (0.1: KL to SFT 3.2 nats, over the bound); simpo: the reward's
    scale (~2.0)."""
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """The loss on a pair: sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023), simpo (Meng et al. 2024)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """> 0: conservative DPO, labels trusted with probability 1 - label_smoothing (loss_type sigmoid only)."""
    simpo_gamma: Annotated[float, Field(ge=0)] = 0.5
    """SimPO's target margin between the chosen and rejected rewards (loss_type simpo only)."""

    @model_validator(mode="after")
    def _smoothing_is_sigmoids(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"@.label_smoothing ({self.label_smoothing}) is conservative DPO, a sigmoid loss: set "
                             f"@.label_smoothing=0 for @.loss_type={self.loss_type} (or @.loss_type=sigmoid)")
        return self

    def label(self) -> str:
        if self.loss_type == "sigmoid":
            return "cdpo" if self.label_smoothing > 0 else "dpo"
        return self.loss_type


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: Literal["sigmoid", "ipo"] = "sigmoid") -> dict[str, torch.Tensor]:
    """The DPO loss per pair and the implicit rewards (all (B,)), from summed log-probs.

    sigmoid: -log sigmoid(r(chosen) - r(rejected)); `label_smoothing` > 0 is the conservative DPO of Mitchell
    (2023): the label is trusted with probability 1 - label_smoothing. ipo: (h - 1/(2 beta))^2 with h the
    difference of the log-ratios, r(chosen) - r(rejected) = beta h (`label_smoothing` does not apply).
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    logits = chosen - rejected
    if loss_type == "ipo":
        loss = (logits / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is unknown: choose sigmoid or ipo (simpo: simpo_loss)")
    return {"loss": loss, "chosen": chosen, "rejected": rejected}


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> dict[str, torch.Tensor]:
    """SimPO's loss per pair and its rewards (all (B,)), from summed log-probs and the tokens they sum over: the
    reward is beta times the average log-prob, the loss -log sigmoid(r(chosen) - r(rejected) - gamma)."""
    chosen = beta * policy_chosen / chosen_tokens
    rejected = beta * policy_rejected / rejected_tokens
    return {"loss": -F.logsigmoid(chosen - rejected - gamma), "chosen": chosen, "rejected": rejected}


class DPO(PreferenceObjective):
    """Trains `policy` on preference batches (PreferenceData: chosen rows first, then rejected)."""

    cfg: Config

    def pair_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        logp_c, logp_r = halves(self.logprobs(self.policy, batch))
        if c.loss_type == "simpo":
            n_c, n_r = halves(response_tokens(batch))
            out = simpo_loss(logp_c, logp_r, n_c, n_r, c.beta, c.simpo_gamma)
        else:
            with torch.no_grad():
                ref_c, ref_r = halves(self.logprobs(self.reference, batch))
            out = dpo_loss(logp_c, logp_r, ref_c, ref_r, c.beta, c.label_smoothing, loss_type=c.loss_type)
        return {"loss": out["loss"], "rewards/chosen": out["chosen"], "rewards/rejected": out["rejected"],
                "logps/chosen": logp_c, "logps/rejected": logp_r}


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    return fit_preference(DPO(policy.train(), reference, acfg), cfg, spec, tok, callbacks)
