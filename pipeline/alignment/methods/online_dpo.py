"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"; TRL's OnlineDPOTrainer):
DPO on pairs the current policy samples and a judge ranks.

Per iteration (pipeline.alignment.online):
1. each prompt gets two samples from the current policy (KV-cache sampler, stop at <|end|>);
2. the judge scores both: the frozen reward model as PPO scores (`missing_eos_penalty`, `score_clip`), or the
   generator's checker (`judge: checker`, GRPO's verifiable reward); the higher is chosen, and a tie (both right,
   both wrong, the same response) is dropped: it says nothing about which is better;
3. `epochs` passes of minibatch DPO steps on the pairs (pipeline.alignment.methods.dpo.dpo_loss), against the frozen
   SFT reference. Log-probabilities are the models' own (temperature 1), whatever the sampling temperature: the
   implicit reward beta log(pi/ref) is the policy's, not its sampler's.
Minibatches are of prompts, ties weighted 0, so every rank takes as many steps whatever its ties (DDP) and the
policy's updates are known before the run (sft_control matches them). Metrics carry TRL's names: rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, objective/scores, objective/kl.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from pipeline.alignment import online
from pipeline.alignment.methods.dpo import dpo_loss
from pipeline.alignment.online import Judge, OnlineConfig, OnlineObjective, fit_online, load_judge
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import response_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.parallel import global_mean, token_mean

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

NEEDS = {"reward": "reward"}  # the reward model judges the pairs (unread with judge: checker)
REWARD = next(iter(NEEDS))
SUMMARY = ("objective/scores", "objective/kl", "rewards/margins", "rewards/accuracies", "pairs/tie_rate", "loss")


class Config(OnlineConfig):
    """Online DPO judged by the reward model or the checker (conf/align/online_dpo.yaml)."""

    method: Literal["online_dpo"]
    eval_every: Annotated[int, Field(ge=0)] = 10
    judge: Judge = "reward_model"
    """reward_model (as TRL) | checker: the generator's exact-answer check (GRPO's), which ties often."""
    minibatch_size: Annotated[int, Field(ge=1)] = 64
    """Prompts (pairs, ties weighted 0) per optimizer step (rollout_batch = one step per iteration)."""
    beta: Annotated[float, Field(gt=0)] = 1.0
    """Strength of the implicit KL to the reference (dpo's: at 0.1 offline DPO drifted to KL 3.2 nats)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """> 0: conservative DPO, the judge trusted with probability 1 - label_smoothing."""


splits, updates_at, policy_updates = online.splits, online.updates_at, online.policy_updates  # every online method's


def rank_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pairs of adjacent samples (2N,): which of the two the judge prefers (N,) (0 or 1) and whether it
    prefers one at all (N,) (False for a tie)."""
    pairs = scores.view(-1, 2)
    return (pairs[:, 1] > pairs[:, 0]).long(), pairs[:, 0] != pairs[:, 1]


def pair_loss(logp: torch.Tensor, ref_logp: torch.Tensor, chosen: torch.Tensor, beta: float,
              label_smoothing: float) -> dict[str, torch.Tensor]:
    """dpo_loss of pairs whose sequence log-probs are `logp`, `ref_logp` (N, 2), the chosen one's column `chosen`."""
    rows = torch.arange(len(chosen), device=logp.device)
    return dpo_loss(logp[rows, chosen], logp[rows, 1 - chosen], ref_logp[rows, chosen], ref_logp[rows, 1 - chosen],
                    beta, label_smoothing)


def sequence_logp(model: GPT, b: dict, rows: torch.Tensor) -> torch.Tensor:
    """Summed response log-probs of rollout `b`'s `rows` under `model` at temperature 1."""
    logp = response_logprobs(model, b["seq"][rows], b["attn"][rows], b["P"])[0]
    return (logp * b["mask"][rows]).sum(1)


class OnlineDPO(OnlineObjective):
    """Trains `policy`; `reference` and `reward_model` (when it judges) stay frozen."""

    def minibatch_loss(self, b: dict, ranked: dict, mb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The mean DPO loss of minibatch `mb` (pair indices of this rank's rollout `b`) over its untied pairs in
        all ranks (pipeline.training.parallel.token_mean), and its statistics over them."""
        c = self.cfg
        rows = torch.stack([2 * mb, 2 * mb + 1], 1).flatten()  # a pair's two samples are adjacent
        logp = sequence_logp(self.policy, b, rows).view(-1, 2)
        chosen, valid = ranked["chosen"][mb], ranked["valid"][mb]
        out = pair_loss(logp, ranked["ref"][mb], chosen, c.beta, c.label_smoothing)
        loss = token_mean(out["loss"], valid)
        with torch.no_grad():
            pairs = torch.arange(len(mb), device=logp.device)
            stats = {"loss": out["loss"], "rewards/chosen": out["chosen"], "rewards/rejected": out["rejected"],
                     "rewards/accuracies": (out["chosen"] > out["rejected"]).float(),
                     "rewards/margins": out["chosen"] - out["rejected"],
                     "logps/chosen": logp[pairs, chosen], "logps/rejected": logp[pairs, 1 - chosen]}
            stats = {k: global_mean(v, valid) for k, v in stats.items()}  # over every rank's untied pairs
        return loss, stats

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        """One iteration on this rank's share of the global prompt batch: sample, judge and rank its pairs, then
        DPO steps on them."""
        c = self.cfg
        rows, b, scores = self.rollout(rows, 2)
        chosen, valid = rank_pairs(scores)
        everything = torch.arange(len(rows), device=self.device)
        with torch.no_grad():
            ref = sequence_logp(self.reference, b, everything)
            kl = sequence_logp(self.policy, b, everything) - ref  # k1 of the sampled responses, at temperature 1
        ranked = {"ref": ref.view(-1, 2), "chosen": chosen, "valid": valid}
        stats = self.update(len(rows) // 2, lambda mb: self.minibatch_loss(b, ranked, mb))
        pairs = scores.view(-1, 2)
        self.log_iteration(b, scores, {
            **stats, "objective/kl": kl.mean(), "pairs/tie_rate": 1 - valid.float().mean(), "beta": c.beta,
            "objective/scores_margin": global_mean(pairs.max(1).values - pairs.min(1).values, valid)})


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    reward_model = load_judge(acfg.judge, policy, tok, REWARD)
    return fit_online(cfg, spec, OnlineDPO(policy.train(), reference, reward_model, tok, acfg, cfg.seed), callbacks)
