"""What the offline preference methods share (methods dpo, kto, orpo): their data fields, one objective that logs
TRL's metric names, and the fit.

Each method reads the preference split (plus, optionally, on-policy pairs: the SFT model's own wrong samples
against the correct answer, `pipeline.training.reward.on_policy_pairs`) as PreferenceData batches, chosen rows
first, then rejected. Its objective says what one batch gives per pair (`pair_stats`: the loss and the implicit
rewards, each (B/2,)); the shared objective logs their means in training (train/...) and their means over exactly
the held-out pairs in validation (val/...). Every batch holds as many pairs on every rank, so the synced means
are those of one device. One optimizer step per batch: `updates_at(cfg, n) == n`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from pipeline import paths
from pipeline.config.align import MethodConfig
from pipeline.config.training import OnPolicyConfig
from pipeline.data.datamodules import PreferenceData
from pipeline.data.packing import padding_share, sequence_tokens
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import packed_sequence_logprobs, sequence_logprobs
from pipeline.training.curves import CurveRecorder, mean_of
from pipeline.training.objective import Objective
from pipeline.training.parallel import gpt_like, trained_module
from pipeline.training.reward import on_policy_splits, sample_on_policy
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec


class PreferenceConfig(MethodConfig):
    """The fields of every offline preference method: its batches, its held-out pairs, its on-policy pairs."""

    eval_every: Annotated[int, Field(ge=0)] = 50
    batch_size: Annotated[int, Field(ge=1)] = 32
    """Pairs per step."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Preference pairs held out to log val/rewards/accuracies."""
    val_every: Annotated[int, Field(ge=1)] = 50
    val_batches: Annotated[int, Field(ge=1)] = 4
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Pairs from the SFT policy's own wrong samples (checker-labelled), added to the preference split."""
    packing: bool = True
    """Pack each batch's chosen and rejected sequences into rows of model.block_size (pipeline.data.packing)
    instead of padding them: the same log-probs, fewer positions."""

    def answer_budgets(self) -> dict[str, int]:
        return {"on_policy.max_new_tokens": self.on_policy.max_new_tokens}


def splits(cfg: PreferenceConfig) -> tuple[str, ...]:
    return on_policy_splits(cfg.on_policy)


def updates_at(cfg: PreferenceConfig, batches: int) -> int:
    """Policy updates after `batches` training batches: one optimizer step each."""
    return batches


def policy_updates(cfg: PreferenceConfig) -> int:
    return updates_at(cfg, cfg.steps)


def response_tokens(batch: dict) -> torch.Tensor:
    """The tokens `sequence_logprobs` sums over, per sequence (B,): for the length-normalised log-probs."""
    mask = batch["response_mask"]
    if "sequence_ids" in batch:  # packed rows
        ids = batch["sequence_ids"][:, 1:]
        take = (mask[:, 1:] > 0) & (ids >= 0)
        counts = torch.zeros(batch["last"].numel(), dtype=mask.dtype, device=mask.device)
        return counts.index_add(0, ids[take], mask[:, 1:][take]).clamp(min=1)
    return mask[:, 1:].sum(1).clamp(min=1)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A PreferenceData batch's rows split into (chosen, rejected)."""
    half = x.size(0) // 2
    return x[:half], x[half:]


class PreferenceObjective(Objective):
    """Trains `policy` on preference batches; a method says what a batch gives per pair (`pair_stats`).

    `reference` (the frozen SFT model) is kept whether or not the method calls it: the evaluations during the run
    measure the policy's KL to it."""

    frozen = ("reference",)

    def __init__(self, policy: GPT, reference: GPT, cfg: PreferenceConfig) -> None:
        super().__init__(cfg.optim, cfg.steps)
        self.policy, self.reference, self.cfg = policy, reference, cfg
        reference.requires_grad_(False)  # eval mode once training starts (Objective.frozen)

    def configure_optimizers(self):
        self.reference.requires_grad_(False)  # keep the frozen copy out of the optimizer's groups
        return super().configure_optimizers()

    def pair_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-pair values (B/2,) of the batch: "loss" (what training minimises, averaged), "rewards/chosen" and
        "rewards/rejected" (the method's implicit rewards), and any of the method's own."""
        raise NotImplementedError

    def logprobs(self, model: GPT, batch: dict) -> torch.Tensor:
        """Summed log-probs of each sequence's response (B,)."""
        if "sequence_ids" in batch:  # packed rows
            return packed_sequence_logprobs(model, batch["input_ids"], batch["document_ids"], batch["response_mask"],
                                            batch["sequence_ids"], batch["last"].numel())
        return sequence_logprobs(model, batch["input_ids"], batch["response_mask"])

    def stats(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.pair_stats(batch)
        chosen, rejected = out["rewards/chosen"], out["rewards/rejected"]
        return {**out, "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_throughput(sequence_tokens(batch), batch_idx)  # real tokens, padded or packed alike
        self.log("train/padding", padding_share(batch), sync_dist=True)  # the mean over ranks
        out = self.stats(batch)
        pairs = out["loss"].size(0)
        loss = out["loss"].mean()
        # every rank holds as many pairs: exact means
        self.log_dict({f"train/{k}": v.mean() for k, v in out.items()}, batch_size=pairs, sync_dist=True)
        self.log("train/reward", out["rewards/margins"].mean(), prog_bar=True, batch_size=pairs, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-pair values, averaged over exactly the held-out pairs of every rank (Objective.accumulate)."""
        self.accumulate("val", self.stats(batch), batch["weight"])


def fit_preference(module: PreferenceObjective, cfg: PipelineConfig, spec: StageSpec, tok: ChatTokenizer,
                   callbacks: list | None = None, data_type: type[PreferenceData] = PreferenceData,
                   ) -> tuple[CurveRecorder, dict, GPT | None]:
    """Fit `module` on the preference split (and its on-policy pairs, sampled in the datamodule's setup) as a
    method's `train` does: (the curves, the method's own metrics, the trained policy on global rank 0)."""
    policy, acfg = module.policy, module.cfg
    data = data_type(paths.PREPARED, tok, policy.config.block_size, acfg.batch_size, cfg.seed, acfg.val_fraction,
                     lambda trainer: sample_on_policy(policy, tok, acfg.on_policy, cfg.seed, trainer),
                     packing=acfg.packing)
    trainer, curves, final = fit(module, data, cfg, spec, callbacks=callbacks, max_steps=acfg.steps,
                                 val_every=acfg.val_every, val_batches=acfg.val_batches, grad_clip=acfg.grad_clip)
    own = {"on_policy_pairs": len(data.extra_rows), "held_out_pairs": len(data.val_rows),
           "padding": mean_of(curves.train, "train/padding"),
           **{k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")}}
    return curves, own, trained_module(trainer, module, "policy", gpt_like(policy))
