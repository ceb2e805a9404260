"""What the online methods that score their own samples share (rloo, reinforce_pp, online_dpo): their config's batch
fields, the interface's `splits`, `updates_at` and `policy_updates` (pipeline.alignment.methods), and the module
that samples, scores, updates and logs one iteration.

An iteration samples `rollout_batch` prompts' worth of responses from the current policy (each rank its share:
pipeline.data.datamodules.PromptData), scores them with the judge and takes `epochs` passes of minibatch updates.
The judge is the frozen reward model (scores as PPO takes them: pipeline.alignment.rollout.reward_model_scores) or,
with no reward model, the generator's checker (GRPO's verifiable reward). The module keeps the trained GPT in
`policy`, the frozen one in `reference` and the reward model, when it has one, in `reward_model`; without one it
has no such attribute (Objective.frozen names what is there).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from pipeline import paths
from pipeline.alignment.methods.grpo import verifiable_rewards
from pipeline.alignment.rollout import (
    RolloutConfig,
    clipped_policy_loss,
    clock,
    log_times,
    manual_step,
    minibatches,
    reward_model_scores,
    sample_rollout,
)
from pipeline.data.datamodules import PromptData
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_reward_model
from pipeline.model.heads import ScalarHead
from pipeline.model.logprobs import response_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.objective import Objective
from pipeline.training.parallel import gpt_like, token_mean, trained_module
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

Judge = Literal["reward_model", "checker"]
Positive = Annotated[int, Field(ge=1)]


class OnlineConfig(RolloutConfig):
    """Prompts per iteration, the passes over their samples and the minibatch, and how the reward model scores."""

    group_field: ClassVar[str | None] = None
    """The field giving the samples per prompt a minibatch counts (None: a minibatch counts prompts)."""

    rollout_batch: Positive = 64
    """Prompts per iteration."""
    epochs: Positive = 1
    minibatch_size: Positive = 64
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never emits the end token."""
    score_clip: Annotated[float, Field(ge=0)] = 10.0
    """Clip reward-model scores to [-score_clip, score_clip]; 0 = off."""

    def per_iteration(self) -> int:
        """What the minibatches of one iteration split: its samples (or prompts)."""
        return self.rollout_batch * (getattr(self, self.group_field) if self.group_field else 1)

    def updates_at(self, batches: int) -> int:
        """Policy updates after `batches` iterations: `epochs` passes of minibatches each."""
        return batches * self.epochs * -(-self.per_iteration() // self.minibatch_size)

    @model_validator(mode="after")
    def _minibatch_fits(self):
        if self.minibatch_size > self.per_iteration():
            times = f" x @.{self.group_field}" if self.group_field else ""
            raise ValueError(f"@.minibatch_size ({self.minibatch_size}) must be <= @.rollout_batch{times} "
                             f"({self.per_iteration()})")
        return self


class RewardConfig(OnlineConfig):
    """An online method trained on each sample's reward by the clipped surrogate (OnlineObjective.surrogate_loss)."""

    reward: Judge = "reward_model"
    """reward_model (as TRL and OpenRLHF) | checker: the generator's exact-answer check (GRPO's)."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    """beta: the KL to the frozen SFT reference it subtracts from the reward (per sequence in rloo, per token in
    reinforce_pp); 0 = none."""
    cliprange: Annotated[float, Field(gt=0, lt=1)] = 0.2


def splits(cfg: OnlineConfig) -> tuple[str, ...]:
    return ("rl_prompts",)


def updates_at(cfg: OnlineConfig, batches: int) -> int:
    return cfg.updates_at(batches)


def policy_updates(cfg: OnlineConfig) -> int:
    return cfg.updates_at(cfg.steps)


def load_judge(judge: Judge, policy: GPT, tok: ChatTokenizer, name: str) -> ScalarHead | None:
    """Checkpoint `name` as the reward model when `judge` is reward_model; None for the checker."""
    return load_reward_model(policy.config, tok.sha256, name) if judge == "reward_model" else None


class OnlineObjective(Objective):
    """Trains `policy` under manual optimization from samples it draws itself; `reference` and `reward_model`
    stay frozen."""

    frozen = ("reference", "reward_model")

    def __init__(self, policy: GPT, reference: GPT, reward_model: ScalarHead | None, tok: ChatTokenizer,
                 cfg: OnlineConfig, seed: int) -> None:
        super().__init__(cfg.optim, cfg.updates_at(cfg.steps))
        self.automatic_optimization = False
        self.policy, self.reference, self.tok, self.cfg, self.seed = policy, reference, tok, cfg, seed
        reference.requires_grad_(False)  # eval mode once training starts (Objective.frozen)
        if reward_model is not None:  # absent, not None: Objective.frozen_modules lists what is there
            self.reward_model = reward_model.requires_grad_(False)
        self._times: list[float] = []

    def configure_optimizers(self):
        self.reference.requires_grad_(False)  # keep the frozen copies out of the optimizer's groups
        return super().configure_optimizers()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.generator = self.make_generator(self.seed)

    def score(self, rows: list[dict], b: dict) -> torch.Tensor:
        """Each sample's scalar reward (B,): the reward model's score, or the checker's 1/0 without one."""
        if hasattr(self, "reward_model"):
            c = self.cfg
            return reward_model_scores(self.reward_model, b, c.missing_eos_penalty, c.score_clip)
        return verifiable_rewards(self.tok, rows, b["responses"]).to(self.device)

    def rollout(self, rows: list[dict], n: int) -> tuple[list[dict], dict, torch.Tensor]:
        """Sample `n` responses to each prompt of this rank's `rows` (a prompt's samples adjacent, on this rank) and
        score them: the repeated rows, the rollout (`sample_rollout`) and the scores (B,)."""
        self._times = [clock(self.device)]
        rows = [r for r in rows for _ in range(n)]
        self.policy.eval()  # no dropout while sampling and scoring
        b = sample_rollout(self.policy, self.tok, rows, self.cfg, self.generator, self.device)
        self.count_tokens(b["attn"].sum())  # prompt + response tokens the updates train on
        return rows, b, self.score(rows, b)

    @torch.no_grad()
    def reference_logprobs(self, b: dict, temperature: float = 1.0) -> torch.Tensor:
        return response_logprobs(self.reference, b["seq"], b["attn"], b["P"], temperature=temperature)[0]

    def update(self, n: int, loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
        """`epochs` shuffled passes over this rank's `n` rollout rows (or prompts), one optimizer step per minibatch
        (`minibatch_size` in all ranks), `loss_of(indices)` giving its loss and statistics; the statistics' means
        over the steps. Gradients are synchronised by the strategy."""
        c = self.cfg
        self.policy.train()
        self._times.append(clock(self.device))
        stats: dict[str, list[torch.Tensor]] = {}
        for mb in minibatches(n, c.minibatch_size, c.epochs, self.seed + self.global_step):
            loss, step_stats = loss_of(mb.to(self.device))
            manual_step(self, loss, c.grad_clip)
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def surrogate_loss(self, b: dict, adv: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate of minibatch `mb` (row indices of this rank's rollout `b`), `adv` the rows'
        advantages per token (B, R) or per row (B, 1), and its statistics; token means over the global minibatch
        (pipeline.training.parallel.token_mean), as one device would take them."""
        c = self.cfg
        m, old = b["mask"][mb], b["logp"][mb]
        logp = response_logprobs(self.policy, b["seq"][mb], b["attn"][mb], b["P"], temperature=c.temperature)[0]
        per_token, ratio = clipped_policy_loss(logp, old, adv[mb], c.cliprange)
        loss = token_mean(per_token, m)
        with torch.no_grad():
            stats = {"loss/policy_avg": loss.detach(),
                     "policy/clipfrac_avg": token_mean(((ratio - 1).abs() > c.cliprange).float(), m),
                     "policy/approxkl_avg": token_mean(0.5 * (logp - old) ** 2, m), "val/ratio": token_mean(ratio, m)}
        return loss, stats

    def log_iteration(self, b: dict, scores: torch.Tensor, stats: dict) -> None:
        """Log the method's `stats` with what every iteration has (TRL's names; `train/reward` and, where
        `objective/kl` is among the stats, `train/kl` on the progress bar) and its times. Every rank holds as many
        samples: the mean of the ranks' means is exact."""
        self.log_dict({
            **stats, "objective/scores": scores.mean(), "objective/entropy": (-b["logp"] * b["mask"]).sum(1).mean(),
            "objective/response_length": b["lengths"].float().mean(), "objective/eos_rate": b["ended"].mean(),
            "lr": self.lr_schedulers().get_last_lr()[0],
        }, prog_bar=False, sync_dist=True)
        self.log("train/reward", scores.mean(), prog_bar=True, sync_dist=True)
        if "objective/kl" in stats:
            self.log("train/kl", stats["objective/kl"], prog_bar=True, sync_dist=True)
        log_times(self, *self._times, clock(self.device))


def fit_online(cfg: PipelineConfig, spec: StageSpec, module: OnlineObjective,
               callbacks: list | None) -> tuple[CurveRecorder, dict, GPT | None]:
    """Fit `module` for `steps` iterations under the configured strategy; what a method's `train` returns."""
    acfg = module.cfg
    data = PromptData(paths.PREPARED, acfg.rollout_batch, acfg.steps, cfg.seed)
    trainer, curves, _ = fit(module, data, cfg, spec, callbacks=callbacks, validate=False, max_epochs=1, log_every=1)
    return curves, {"iterations": acfg.steps}, trained_module(trainer, module, "policy", gpt_like(module.policy))

