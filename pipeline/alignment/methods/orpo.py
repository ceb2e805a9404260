"""Odds-ratio preference optimisation (Hong et al. 2024): supervised finetuning with a penalty on the rejected
response's odds, and no reference model.

With p(y | x) = exp(the average log-prob per response token), odds(y | x) = p / (1 - p), the loss on a pair is
    -log p(chosen) + lambda_or * -log sigmoid(log odds(chosen) - log odds(rejected))
the NLL of the chosen response plus lambda_or times the odds-ratio loss. The NLL is the chosen response's mean
per-token NLL, averaged over pairs like the odds (each answer weighs the same; TRL averages over every chosen
token of the batch, which for answers of a few tokens differs little).

The data are DPO's (the preference split and its optional on-policy pairs, pipeline.alignment.preference).
The frozen SFT reference is kept only for the evaluations during the run (KL to SFT): the loss never calls it.
Metrics carry TRL's names: rewards/chosen and rewards/rejected (lambda_or * average log-prob), rewards/margins,
nll_loss, log_odds_ratio (the mean log sigmoid of the log odds ratio) and log_odds_chosen (the mean log odds ratio).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.alignment import preference
from pipeline.alignment.preference import PreferenceConfig, PreferenceObjective, fit_preference, halves, response_tokens
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.training.curves import CurveRecorder

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS: dict[str, str] = {}
SUMMARY = ("train/loss", "train/nll_loss", "train/log_odds_ratio", "train/rewards/accuracies")
splits, updates_at, policy_updates = preference.splits, preference.updates_at, preference.policy_updates
MAX_AVG_LOGP = -1e-6  # an answer the model is sure of (average log-prob 0 in float32) has infinite odds


class Config(PreferenceConfig):
    """ORPO on preference pairs, reference-free (conf/align/orpo.yaml)."""

    method: Literal["orpo"]
    lambda_or: Annotated[float, Field(gt=0)] = 0.1
    """lambda, the weight of the odds-ratio loss beside the NLL (the paper's 0.1; TRL calls it beta)."""


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p: log p - log(1 - exp(log p)), with expm1 for p near 1."""
    avg_logp = avg_logp.clamp(max=MAX_AVG_LOGP)
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, lambda_or: float) -> dict[str, torch.Tensor]:
    """ORPO's loss per pair from average per-token log-probs (all (B,)): {"loss", "nll", "log_odds" (the log odds
    ratio), "log_odds_ratio" (its log sigmoid), "chosen", "rejected" (the rewards lambda_or * average log-prob)}."""
    ratio = log_odds(avg_chosen) - log_odds(avg_rejected)
    log_sig = F.logsigmoid(ratio)
    return {"loss": -avg_chosen - lambda_or * log_sig, "nll": -avg_chosen, "log_odds": ratio, "log_odds_ratio": log_sig,
            "chosen": lambda_or * avg_chosen, "rejected": lambda_or * avg_rejected}


class ORPO(PreferenceObjective):
    """Trains `policy` on preference batches (PreferenceData: chosen rows first, then rejected); never calls the
    reference."""

    cfg: Config

    def pair_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        logp = self.logprobs(self.policy, batch)
        avg_c, avg_r = halves(logp / response_tokens(batch))
        out = orpo_loss(avg_c, avg_r, self.cfg.lambda_or)
        logp_c, logp_r = halves(logp)
        return {"loss": out["loss"], "rewards/chosen": out["chosen"], "rewards/rejected": out["rejected"],
                "nll_loss": out["nll"], "log_odds_ratio": out["log_odds_ratio"], "log_odds_chosen": out["log_odds"],
                "logps/chosen": logp_c, "logps/rejected": logp_r}


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    return fit_preference(ORPO(policy.train(), reference, acfg), cfg, spec, tok, callbacks)
