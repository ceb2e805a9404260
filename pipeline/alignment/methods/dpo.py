"""Direct preference optimisation (Rafailov et al. 2023): the policy is its own reward model.

With pi the policy and ref the frozen SFT model, each response gets the implicit reward
    r(x, y) = beta * (log pi(y | x) - log ref(y | x))        (summed over the response's tokens)
and the loss on a pair is the Bradley-Terry loss on those rewards, -log sigmoid(r(chosen) - r(rejected)).
No sampling, no value model: one forward of the policy (and, once per batch, of the reference) per pair.

Pairs are the preference split (correct answer vs a plausible corruption) plus, optionally, on-policy
pairs: the SFT model's own wrong samples against the correct answer (`pipeline.training.reward.on_policy_pairs`),
so the loss also pushes down the mistakes this policy actually makes.
Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline import paths
from pipeline.config.align import MethodConfig
from pipeline.config.training import OnPolicyConfig
from pipeline.data.datamodules import PreferenceData
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import sequence_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.objective import Objective
from pipeline.training.parallel import gpt_like, trained_module
from pipeline.training.reward import on_policy_splits, sample_on_policy
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS: dict[str, str] = {}
SUMMARY = ("train/loss", "train/rewards/margins", "train/rewards/accuracies")


class Config(MethodConfig):
    """DPO on preference pairs against the frozen SFT reference (conf/align/dpo.yaml)."""

    method: Literal["dpo"]
    batch_size: Annotated[int, Field(ge=1)] = 32
    """Pairs per step."""
    beta: Annotated[float, Field(gt=0)] = 1.0
    """Strength of the implicit KL to the reference (0.1: KL to SFT 3.2 nats, over the bound)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """> 0: conservative DPO, labels trusted with probability 1 - label_smoothing."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Preference pairs held out to log val/rewards/accuracies."""
    val_every: Annotated[int, Field(ge=1)] = 50
    val_batches: Annotated[int, Field(ge=1)] = 4
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Pairs from the SFT policy's own wrong samples (checker-labelled), added to the preference split."""

    def answer_budgets(self) -> dict[str, int]:
        return {"on_policy.max_new_tokens": self.on_policy.max_new_tokens}


def splits(cfg: Config) -> tuple[str, ...]:
    return on_policy_splits(cfg.on_policy)


def policy_updates(cfg: Config) -> int:
    return cfg.steps


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

    frozen = ("reference",)

    def __init__(self, policy: GPT, reference: GPT, cfg: Config) -> None:
        super().__init__(cfg.optim, cfg.steps)
        self.policy, self.reference, self.cfg = policy, reference, cfg
        reference.requires_grad_(False)  # eval mode once training starts (Objective.frozen)

    def configure_optimizers(self):
        self.reference.requires_grad_(False)  # keep the frozen copy out of the optimizer's groups
        return super().configure_optimizers()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_throughput(batch["input_ids"].numel(), batch_idx)
        ids, mask = batch["input_ids"], batch["response_mask"]
        half = ids.size(0) // 2
        logp = sequence_logprobs(self.policy, ids, mask)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, ids, mask)
        out = dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], self.cfg.beta, self.cfg.label_smoothing)
        loss = out["loss"].mean()
        self.log_dict({
            "train/loss": loss,
            "train/rewards/chosen": out["chosen"].mean(),
            "train/rewards/rejected": out["rejected"].mean(),
            "train/rewards/accuracies": (out["chosen"] > out["rejected"]).float().mean(),
            "train/rewards/margins": (out["chosen"] - out["rejected"]).mean(),
            "train/logps/chosen": logp[:half].mean(),
            "train/logps/rejected": logp[half:].mean(),
        }, prog_bar=False, batch_size=half, sync_dist=True)  # every rank holds as many pairs: exact means
        self.log("train/reward", (out["chosen"] - out["rejected"]).mean(), prog_bar=True, batch_size=half,
                 sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-pair values, averaged over exactly the held-out pairs of every rank (Objective.accumulate)."""
        ids, mask = batch["input_ids"], batch["response_mask"]
        half = ids.size(0) // 2
        logp = sequence_logprobs(self.policy, ids, mask)
        ref = sequence_logprobs(self.reference, ids, mask)
        out = dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], self.cfg.beta, self.cfg.label_smoothing)
        self.accumulate("val", {
            "loss": out["loss"], "rewards/chosen": out["chosen"], "rewards/rejected": out["rejected"],
            "rewards/accuracies": (out["chosen"] > out["rejected"]).float(),
            "rewards/margins": out["chosen"] - out["rejected"],
            "logps/chosen": logp[:half], "logps/rejected": logp[half:]}, batch["weight"])


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer) -> tuple[CurveRecorder, dict, GPT | None]:
    data = PreferenceData(paths.PREPARED, tok, policy.config.block_size, acfg.batch_size, cfg.seed, acfg.val_fraction,
                          lambda trainer: sample_on_policy(policy, tok, acfg.on_policy, cfg.seed, trainer))
    module = DPO(policy.train(), reference, acfg)
    trainer, curves, final = fit(module, data, cfg, spec, max_steps=acfg.steps, val_every=acfg.val_every,
                                 val_batches=acfg.val_batches, grad_clip=acfg.grad_clip)
    own = {"on_policy_pairs": len(data.extra_rows), "held_out_pairs": len(data.val_rows),
           **{k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")}}
    return curves, own, trained_module(trainer, module, "policy", gpt_like(policy))
