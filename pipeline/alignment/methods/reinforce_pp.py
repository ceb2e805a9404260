"""REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning LLMs"; OpenRLHF): PPO's
objective without the critic, its baseline the whole global batch.

Per iteration (pipeline.alignment.online):
1. the policy samples one response per prompt (KV-cache sampler, stop at <|end|>): no groups, whose baseline
   REINFORCE++ replaces with the batch's;
2. the frozen reward model scores each as PPO scores it (`missing_eos_penalty`, `score_clip`), or the generator's
   checker does (`reward: checker`);
3. per-token reward = -kl_coef * KL estimate to the frozen SFT reference (k1 = log pi/ref, as the paper), plus the
   score on the last token;
4. a token's advantage is its discounted return (`gamma`), normalised to mean 0, variance 1 over every response
   token of the global batch, across ranks: the batch is the baseline, not each prompt's group;
5. `epochs` passes of the clipped surrogate over shuffled minibatches.
Metrics carry TRL's (PPO's) names: objective/scores, objective/kl, objective/rlhf_reward, policy/clipfrac_avg, ...
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from pipeline.alignment import online
from pipeline.alignment.online import OnlineObjective, RewardConfig, fit_online, load_judge
from pipeline.alignment.rollout import gae, kl_penalty, masked_whiten
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.training.curves import CurveRecorder

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS = {"reward": "reward"}  # the reward model scores the samples (unread with reward: checker)
REWARD = next(iter(NEEDS))
SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
           "objective/response_length", "policy/approxkl_avg", "policy/clipfrac_avg")


class Config(RewardConfig):
    """REINFORCE++ against the reward model or the checker (conf/align/reinforce_pp.yaml)."""

    method: Literal["reinforce_pp"]
    eval_every: Annotated[int, Field(ge=0)] = 10
    rollout_batch: Annotated[int, Field(ge=1)] = 256
    """Prompts per iteration (the batch is the baseline: large)."""
    minibatch_size: Annotated[int, Field(ge=1)] = 128
    """Samples per optimizer step."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1 = log(pi/ref) (the paper's); k3 = (r - 1) - log r."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Discount of the return each token is credited with."""


splits, updates_at, policy_updates = online.splits, online.updates_at, online.policy_updates  # every online method's


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, R): -kl_coef * kl on every response token, plus each row's score on its last one."""
    rewards = -kl_coef * kl * mask
    rewards[torch.arange(len(scores)), mask.sum(1).long() - 1] += scores
    return rewards


def batch_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each token's discounted return-to-go, whitened over every rank's response tokens (the global batch)."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # no values, lambda 1: the return
    return masked_whiten(returns, mask)


class ReinforcePP(OnlineObjective):
    """Trains `policy`; `reference` and `reward_model` (when it scores) stay frozen."""

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        """One iteration on this rank's share of the global rollout batch; the advantages' statistics are the whole
        batch's, every rank's."""
        c = self.cfg
        rows, b, scores = self.rollout(rows, 1)
        kl = torch.zeros_like(b["logp"])
        if c.kl_coef > 0:
            kl = kl_penalty(b["logp"], self.reference_logprobs(b, c.temperature), c.kl_estimator) * b["mask"]
        adv = batch_advantages(token_rewards(scores, kl, b["mask"], c.kl_coef), b["mask"], c.gamma)
        stats = self.update(len(rows), lambda mb: self.surrogate_loss(b, adv, mb))
        if c.kl_coef > 0:
            stats["objective/kl"] = kl.sum(1).mean()
        self.log_iteration(b, scores, {**stats, "objective/rlhf_reward": (scores - c.kl_coef * kl.sum(1)).mean()})


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    reward_model = load_judge(acfg.reward, policy, tok, REWARD)
    return fit_online(cfg, spec, ReinforcePP(policy.train(), reference, reward_model, tok, acfg, cfg.seed), callbacks)
