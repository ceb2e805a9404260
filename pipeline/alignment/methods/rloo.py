"""REINFORCE with a leave-one-out baseline, RLOO (Ahmadian et al. 2024, "Back to Basics"; TRL's RLOOTrainer).

Per iteration (pipeline.alignment.online):
1. each prompt gets `group_size` (k) samples from the policy (KV-cache sampler, stop at <|end|>);
2. each is scored by the frozen reward model as PPO scores it (`missing_eos_penalty`, `score_clip`), or by the
   generator's checker (`reward: checker`, GRPO's verifiable reward); with `kl_coef` > 0 the sequence's k1 KL to the
   frozen SFT reference, sum_t log(pi/ref), is subtracted from it, as the paper folds it in;
3. a sample's advantage is its reward minus the mean reward of its k - 1 siblings: a baseline free of the sample
   itself, so the estimate stays unbiased, and no critic (it is k/(k-1) times the distance from the group's mean);
4. the whole response takes that one advantage; `epochs` passes of the clipped surrogate over minibatches, one
   pass of one minibatch (the default) being plain on-policy REINFORCE.
Metrics carry TRL's names: objective/scores, objective/kl, objective/rlhf_reward, objective/entropy,
policy/clipfrac_avg, loss/policy_avg.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from pipeline.alignment import online
from pipeline.alignment.methods.grpo import group_advantages
from pipeline.alignment.online import OnlineObjective, RewardConfig, fit_online, load_judge
from pipeline.alignment.rollout import kl_penalty
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.training.curves import CurveRecorder

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS = {"reward": "reward"}  # the reward model scores the samples (unread with reward: checker)
REWARD = next(iter(NEEDS))
SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
           "objective/response_length", "policy/clipfrac_avg")


class Config(RewardConfig):
    """RLOO against the reward model or the checker (conf/align/rloo.yaml)."""

    group_field = "group_size"

    method: Literal["rloo"]
    eval_every: Annotated[int, Field(ge=0)] = 10
    group_size: Annotated[int, Field(ge=2)] = 4
    """k, samples per prompt (>= 2: each sample's baseline is its siblings' mean)."""
    minibatch_size: Annotated[int, Field(ge=1)] = 256
    """Samples per optimizer step (rollout_batch x group_size = one step per iteration: REINFORCE)."""


splits, updates_at, policy_updates = online.splits, online.updates_at, online.policy_updates  # every online method's


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i - mean of the other k - 1 rewards of its group (`k` adjacent rows), which is k/(k-1) (r_i - group mean)."""
    return group_advantages(rewards, k, scale=False) * (k / (k - 1))


class RLOO(OnlineObjective):
    """Trains `policy`; `reference` (read when kl_coef > 0) and `reward_model` (when it scores) stay frozen."""

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        """One iteration on this rank's share of the global rollout batch: whole groups (a prompt's samples are drawn
        on one rank), so the baselines are local."""
        c = self.cfg
        rows, b, scores = self.rollout(rows, c.group_size)
        stats, rewards = {}, scores
        if c.kl_coef > 0:  # measured only when penalised, as grpo
            kl = (kl_penalty(b["logp"], self.reference_logprobs(b, c.temperature), "k1") * b["mask"]).sum(1)
            rewards = scores - c.kl_coef * kl
            stats = {"objective/kl": kl.mean(), "objective/non_score_reward": -c.kl_coef * kl.mean()}
        adv = leave_one_out_advantages(rewards, c.group_size)[:, None]  # one advantage for the whole response
        stats.update(self.update(len(rows), lambda mb: self.surrogate_loss(b, adv, mb)))
        self.log_iteration(b, scores, {**stats, "objective/rlhf_reward": rewards.mean(),
                                       "objective/scores_std": scores.view(-1, c.group_size).std(1).mean()})


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    reward_model = load_judge(acfg.reward, policy, tok, REWARD)
    return fit_online(cfg, spec, RLOO(policy.train(), reference, reward_model, tok, acfg, cfg.seed), callbacks)
