"""RL with a verifiable reward, GRPO style (Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer).

Per iteration:
1. each prompt gets `group_size` samples from the policy (KV-cache sampler, stop at <|end|>);
2. the reward is the generator's own checker: 1 for an exact answer that ends, else 0 (no reward
   model, so nothing to hack);
3. a sample's advantage is its reward minus its group's mean, divided by the group's std when
   `scale_rewards` (Dr. GRPO argues for leaving it off); groups where every sample scored the same
   carry no signal and give zero advantage;
4. `epochs` passes of the clipped surrogate over minibatches (one pass = plain on-policy REINFORCE
   with a group baseline), optionally with a k3 KL penalty to the frozen SFT reference (`kl_coef`;
   `kl` is logged only then: `evaluate` measures KL to SFT for every method).
Metrics carry TRL's names: reward, reward_std, frac_reward_zero_std, kl, clip_ratio, entropy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field, model_validator

from pipeline import paths
from pipeline.alignment.rollout import (
    RolloutConfig,
    clipped_policy_loss,
    clock,
    kl_penalty,
    log_times,
    manual_step,
    minibatches,
    sample_rollout,
)
from pipeline.data.datamodules import PromptData
from pipeline.data.tasks import check
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import response_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.objective import Objective
from pipeline.training.parallel import gpt_like, token_mean, trained_module
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

Positive = Annotated[int, Field(ge=1)]
NEEDS: dict[str, str] = {}  # the reward is the checker: no reward model
SUMMARY = ("reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio", "entropy", "completions/mean_length")


class Config(RolloutConfig):
    """GRPO with the generator's checker as the reward (conf/align/grpo.yaml)."""

    method: Literal["grpo"]
    eval_every: Annotated[int, Field(ge=0)] = 10
    rollout_batch: Positive = 64
    """Prompts per iteration."""
    group_size: Annotated[int, Field(ge=2)] = 8
    """Samples per prompt (>= 2: advantages are relative to the group)."""
    epochs: Positive = 1
    minibatch_size: Positive = 512
    """Samples per optimizer step (rollout_batch x group_size = one step per iteration: on-policy)."""
    scale_rewards: bool = True
    """Divide by the group's std (false = Dr. GRPO)."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    """k3 penalty to the frozen SFT reference; 0 = none (DAPO, Dr. GRPO)."""
    cliprange: Annotated[float, Field(gt=0, lt=1)] = 0.2

    @model_validator(mode="after")
    def _minibatch_fits(self):
        if self.minibatch_size > self.rollout_batch * self.group_size:
            raise ValueError(f"@.minibatch_size ({self.minibatch_size}) must be <= @.rollout_batch x @.group_size "
                             f"({self.rollout_batch * self.group_size})")
        return self


def splits(cfg: Config) -> tuple[str, ...]:
    return ("rl_prompts",)


def updates_at(cfg: Config, batches: int) -> int:
    """Policy updates after `batches` iterations: `epochs` passes of minibatches each."""
    return batches * cfg.epochs * -(-cfg.rollout_batch * cfg.group_size // cfg.minibatch_size)


def policy_updates(cfg: Config) -> int:
    return updates_at(cfg, cfg.steps)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) [/ (std of its group + eps)]; groups are `group_size` adjacent rows."""
    groups = rewards.view(-1, group_size)
    adv = groups - groups.mean(1, keepdim=True)
    if scale:
        adv = adv / (groups.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def verifiable_rewards(tok: ChatTokenizer, rows: list[dict], responses: list[list[int]]) -> torch.Tensor:
    """1.0 where the response ends and its answer checks exactly, else 0.0."""
    return torch.tensor([float(tok.end_id in resp and check(row["answer"], tok.decode(tok.strip_response(resp))))
                         for row, resp in zip(rows, responses)])


class GRPO(Objective):
    """Trains `policy`; `reference` (used only when kl_coef > 0) stays frozen."""

    frozen = ("reference",)

    def __init__(self, policy: GPT, reference: GPT, tok: ChatTokenizer, cfg: Config, seed: int) -> None:
        super().__init__(cfg.optim, policy_updates(cfg))
        self.automatic_optimization = False
        self.policy, self.reference, self.tok, self.cfg, self.seed = policy, reference, tok, cfg, seed
        reference.requires_grad_(False)  # eval mode once training starts (Objective.frozen)

    def configure_optimizers(self):
        self.reference.requires_grad_(False)
        return super().configure_optimizers()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.generator = self.make_generator(self.seed)

    def minibatch_loss(self, b: dict, adv: torch.Tensor, ref_logp: torch.Tensor | None,
                       mb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of minibatch `mb` (row indices of this rank's rollout `b`) and its statistics; token means are
        over the global minibatch (pipeline.training.parallel.token_mean), as one device would take them."""
        c = self.cfg
        m = b["mask"][mb]
        logp, entropy = response_logprobs(self.policy, b["seq"][mb], b["attn"][mb], b["P"], with_entropy=True,
                                          temperature=c.temperature)
        per_token, ratio = clipped_policy_loss(logp, b["logp"][mb], adv[mb, None], c.cliprange)
        stats = {}
        if ref_logp is not None:  # measured only when penalised, as TRL does
            k3 = kl_penalty(logp, ref_logp[mb], "k3")
            per_token = per_token + c.kl_coef * k3
            stats["kl"] = token_mean(k3.detach(), m)
        loss = token_mean(per_token, m)
        with torch.no_grad():
            stats.update({"loss": loss.detach(), "clip": token_mean(((ratio - 1).abs() > c.cliprange).float(), m),
                          "entropy": token_mean(entropy, m)})
        return loss, stats

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        """One iteration on this rank's share of the global rollout batch: whole groups (a prompt's samples are
        drawn on one rank), so group statistics are local; gradients are synchronised by the strategy."""
        c = self.cfg
        rows = [r for r in rows for _ in range(c.group_size)]  # a prompt's samples stay adjacent
        started = clock(self.device)
        self.policy.eval()
        b = sample_rollout(self.policy, self.tok, rows, c, self.generator, self.device)
        self.count_tokens(b["attn"].sum())  # prompt + response tokens the updates train on
        rewards = verifiable_rewards(self.tok, rows, b["responses"]).to(self.device)
        adv = group_advantages(rewards, c.group_size, c.scale_rewards)
        with torch.no_grad():
            ref_logp = (response_logprobs(self.reference, b["seq"], b["attn"], b["P"], temperature=c.temperature)[0]
                        if c.kl_coef > 0 else None)
        self.policy.train()
        sampled = clock(self.device)
        stats: dict[str, list[torch.Tensor]] = {}
        for mb in minibatches(len(rows), c.minibatch_size, c.epochs, self.seed + self.global_step):
            loss, step_stats = self.minibatch_loss(b, adv, ref_logp, mb.to(self.device))
            manual_step(self, loss, c.grad_clip)
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)
        avg = {k: torch.stack(v).mean() for k, v in stats.items()}
        groups = rewards.view(-1, c.group_size)
        if "kl" in avg:
            self.log("kl", avg["kl"], sync_dist=True)
        self.log_dict({
            "reward": rewards.mean(), "reward_std": groups.std(1).mean(),
            "frac_reward_zero_std": (groups.std(1) == 0).float().mean(),
            "clip_ratio": avg["clip"], "entropy": avg["entropy"], "loss": avg["loss"],
            "completions/mean_length": b["mask"].sum(1).float().mean(),
            "completions/eos_rate": b["ended"].mean(), "lr": self.lr_schedulers().get_last_lr()[0],
        }, prog_bar=False, sync_dist=True)  # every rank holds as many groups: the mean of means is exact
        self.log("train/reward", rewards.mean(), prog_bar=True, sync_dist=True)
        log_times(self, started, sampled, clock(self.device))


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    module = GRPO(policy.train(), reference, tok, acfg, cfg.seed)
    data = PromptData(paths.PREPARED, acfg.rollout_batch, acfg.steps, cfg.seed)
    trainer, curves, _ = fit(module, data, cfg, spec, callbacks=callbacks, validate=False, max_epochs=1, log_every=1)
    return curves, {"iterations": acfg.steps}, trained_module(trainer, module, "policy", gpt_like(policy))
