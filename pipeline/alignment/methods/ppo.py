"""PPO for RLHF: sample from the policy, score with the reward model, update with a clipped objective.

Per rollout batch (Ouyang et al. 2022; TRL's PPOTrainer):
1. the policy samples a response per prompt with the KV-cache sampler, stopping at <|end|>;
2. the frozen reward model scores each full exchange at its last token (a response that never ends
   loses `missing_eos_penalty`); the frozen SFT reference gives per-token log-probs;
3. per-token reward = -beta * KL estimate, plus the score on the last token; beta is `kl_coef`, or,
   with `adaptive_kl.target` set, Ziegler et al.'s (2019) proportional controller steering the
   measured KL toward the target;
4. a critic (initialised from the reward model) gives values; GAE(gamma, lam) gives advantages;
5. `ppo_epochs` passes over shuffled minibatches: clipped policy loss, clipped value loss,
   optional entropy bonus.
The first `critic_warmup` iterations update only the critic: a value head fresh from the reward
model's scalar head predicts badly, and advantages built from its errors would push the policy at
random (OpenRLHF calls this freezing the actor).
Metrics carry TRL's names (objective/kl, objective/scores, policy/clipfrac_avg, ...).
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
    gae,
    group_centre,
    kl_penalty,
    log_times,
    manual_step,
    masked_whiten,
    minibatches,
    sample_rollout,
)
from pipeline.config.schema import Schema
from pipeline.data.datamodules import PromptData
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.sequences import response_positions
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_reward_model
from pipeline.model.heads import ScalarHead
from pipeline.model.logprobs import response_logprobs
from pipeline.training.curves import CurveRecorder
from pipeline.training.objective import Objective, lr_lambda
from pipeline.training.parallel import global_mean, gpt_like, token_mean, trained_module, world_size
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config as PipelineConfig
    from pipeline.registry import StageSpec

Positive = Annotated[int, Field(ge=1)]
NEEDS = {"reward": "reward"}  # the reward model: it scores the rollouts, and the critic starts from it
REWARD = next(iter(NEEDS))
SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
           "objective/response_length", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg")


class AdaptiveKLConfig(Schema):
    target: Annotated[float, Field(gt=0)] | None = None
    """nats per response to steer beta toward (Ziegler et al. 2019); null = the fixed kl_coef."""
    horizon: Positive = 10000


class Config(RolloutConfig):
    """PPO against the reward model (conf/align/ppo.yaml)."""

    method: Literal["ppo"]
    eval_every: Annotated[int, Field(ge=0)] = 10
    critic_warmup: Annotated[int, Field(ge=0)] = 5
    """Extra iterations first, updating only the critic."""
    rollout_batch: Positive = 256
    """Prompts per iteration."""
    samples_per_prompt: Positive = 1
    group_baseline: bool = False
    """Subtract the mean score of a prompt's samples (needs samples_per_prompt > 1)."""
    ppo_epochs: Positive = 1
    minibatch_size: Positive = 128
    critic_lr: Annotated[float, Field(gt=0)] = 1e-4
    """The value model's learning rate (the policy's is optim.lr)."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    """beta of the per-token KL penalty to the frozen SFT reference (the initial value if adaptive)."""
    adaptive_kl: AdaptiveKLConfig = AdaptiveKLConfig()
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1 = log(pi/ref); k3 = (r - 1) - log r."""
    cliprange: Annotated[float, Field(gt=0, lt=1)] = 0.2
    cliprange_value: Annotated[float, Field(gt=0)] = 0.2
    vf_coef: Annotated[float, Field(ge=0)] = 0.5
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never emits the end token."""
    score_clip: Annotated[float, Field(ge=0)] = 10.0
    """Clip reward-model scores to [-score_clip, score_clip]; 0 = off."""

    @model_validator(mode="after")
    def _minibatch_fits(self):
        if self.minibatch_size > self.rollout_batch * self.samples_per_prompt:
            raise ValueError(f"@.minibatch_size ({self.minibatch_size}) must be <= @.rollout_batch x "
                             f"@.samples_per_prompt ({self.rollout_batch * self.samples_per_prompt})")
        return self


def splits(cfg: Config) -> tuple[str, ...]:
    return ("rl_prompts",)


def updates_at(cfg: Config, batches: int) -> int:
    """Optimizer steps that moved the policy after `batches` iterations (the critic-only warmup ones move none)."""
    per_iteration = cfg.ppo_epochs * -(-cfg.rollout_batch * cfg.samples_per_prompt // cfg.minibatch_size)
    return max(0, batches - cfg.critic_warmup) * per_iteration


def policy_updates(cfg: Config) -> int:
    return updates_at(cfg, cfg.steps + cfg.critic_warmup)


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) after each rollout of n samples."""

    def __init__(self, init: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value


def updates_per_run(cfg: Config) -> int:
    return policy_updates(cfg) * (cfg.steps + cfg.critic_warmup) // cfg.steps


class PPO(Objective):
    """Trains `policy` and `critic`; `reference` and `reward_model` stay frozen."""

    frozen = ("reference", "reward_model")

    def __init__(self, policy: GPT, reference: GPT, critic: ScalarHead, reward_model: ScalarHead,
                 tok: ChatTokenizer, cfg: Config, seed: int) -> None:
        super().__init__(cfg.optim, updates_per_run(cfg))
        self.automatic_optimization = False
        self.policy, self.reference, self.critic, self.reward_model = policy, reference, critic, reward_model
        for frozen in (reference, reward_model):
            frozen.requires_grad_(False)  # eval mode once training starts (Objective.frozen)
        self.tok, self.cfg, self.seed = tok, cfg, seed
        ak = cfg.adaptive_kl
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, ak.target, ak.horizon) if ak.target else None

    @property
    def beta(self) -> float:
        return self.kl_ctl.value if self.kl_ctl else self.cfg.kl_coef

    def configure_optimizers(self):
        """AdamW with the policy at `optim.lr` and the critic at `critic_lr`; same schedule for both."""
        o, c = self.optim_cfg, self.cfg
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": o.lr},
                  {"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": c.critic_lr}]
        opt = torch.optim.AdamW(groups, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                fused=self.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, self.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["objective"]["kl_coef"] = self.beta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.kl_ctl:  # the adaptive coefficient where the killed run had moved it
            self.kl_ctl.value = self._restored.pop("kl_coef", self.kl_ctl.value)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.generator = self.make_generator(self.seed)

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> dict:
        c = self.cfg
        b = sample_rollout(self.policy, self.tok, rows, c, self.generator, self.device)
        seq, attn, mask, P, logp, lengths = b["seq"], b["attn"], b["mask"], b["P"], b["logp"], b["lengths"]
        ref_logp, _ = response_logprobs(self.reference, seq, attn, P, temperature=c.temperature)
        values = self.critic.per_token(seq, attn)[:, P - 1:-1]
        scores = self.reward_model(seq, P + lengths - 1, attn, response_mask=response_positions(mask, P))
        ended = b["ended"].bool()
        scores = scores - c.missing_eos_penalty * (~ended).float()
        if c.score_clip:  # trlX's cliprange_reward: one outlier must not dominate the whitened advantages
            scores = scores.clamp(-c.score_clip, c.score_clip)
        kl = kl_penalty(logp, ref_logp, c.kl_estimator) * mask
        rewards = -self.beta * kl
        k = c.samples_per_prompt
        # with several samples per prompt, score each against its siblings: prompt difficulty cancels
        centred = group_centre(scores, k) if c.group_baseline and k > 1 else scores
        rewards[torch.arange(len(rows)), lengths - 1] += centred
        adv, returns = gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            adv = masked_whiten(adv, mask)
        return {"seq": seq, "attn": attn, "mask": mask, "P": P, "logp": logp, "values": values, "adv": adv,
                "returns": returns, "scores": scores, "kl": kl.sum(1), "ended": ended.float(),
                "lengths": lengths.float(), "neg_logp": (-logp * mask).sum(1)}

    def minibatch_loss(self, b: dict, mb: torch.Tensor, train_policy: bool) -> tuple[torch.Tensor, dict]:
        """The loss of minibatch `mb` (row indices of this rank's rollout `b`) and its statistics.

        Token means are over the global minibatch (pipeline.training.parallel.token_mean): under DDP the
        averaged gradient is the one the whole minibatch gives on one device, and the statistics, averaged
        over the ranks when logged, are the whole minibatch's."""
        c = self.cfg
        m = b["mask"][mb]
        logp, entropy = response_logprobs(self.policy, b["seq"][mb], b["attn"][mb], b["P"], with_entropy=True,
                                          temperature=c.temperature)
        logratio = logp - b["logp"][mb]
        pg, ratio = clipped_policy_loss(logp, b["logp"][mb], b["adv"][mb], c.cliprange)
        pg_loss = token_mean(pg, m)
        vpred = self.critic.per_token(b["seq"][mb], b["attn"][mb])[:, b["P"] - 1:-1]
        old_v, ret = b["values"][mb], b["returns"][mb]
        vclipped = old_v + (vpred - old_v).clamp(-c.cliprange_value, c.cliprange_value)
        vf = 0.5 * torch.max((vpred - ret) ** 2, (vclipped - ret) ** 2)
        vf_loss = token_mean(vf, m)
        ent = token_mean(entropy, m)
        loss = c.vf_coef * vf_loss + (pg_loss - c.entropy_coef * ent) * float(train_policy)
        with torch.no_grad():
            stats = {"pg": pg_loss.detach(), "vf": vf_loss.detach(), "approxkl": token_mean(0.5 * logratio ** 2, m),
                     "clipfrac": token_mean(((ratio - 1).abs() > c.cliprange).float(), m),
                     "ratio": token_mean(ratio, m),
                     "vclipfrac": token_mean(((vpred - old_v).abs() > c.cliprange_value).float(), m),
                     "entropy": ent.detach()}
        return loss, stats

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        """One iteration on this rank's share of the global rollout batch (pipeline.data.datamodules.PromptData):
        sample and score it, then `ppo_epochs` passes of minibatch updates, gradients synchronised by the strategy."""
        c = self.cfg
        rows = [r for r in rows for _ in range(c.samples_per_prompt)]  # siblings stay adjacent, on one rank
        started = clock(self.device)
        self.policy.eval()  # no dropout while sampling and scoring
        b = self.rollout(rows)
        self.policy.train()
        sampled = clock(self.device)
        self.count_tokens(b["attn"].sum())  # prompt + response tokens the updates train on
        stats: dict[str, list[torch.Tensor]] = {}
        train_policy = batch_idx >= c.critic_warmup
        for mb in minibatches(len(rows), c.minibatch_size, c.ppo_epochs, self.seed + self.global_step):
            loss, step_stats = self.minibatch_loss(b, mb.to(self.device), train_policy)
            manual_step(self, loss, c.grad_clip)
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)
        avg = {k: torch.stack(v).mean() for k, v in stats.items()}
        kl = b["kl"].mean()
        beta = self.beta  # the coefficient this rollout was shaped with
        if self.kl_ctl and train_policy:  # the whole rollout's KL, so every rank moves beta alike
            self.kl_ctl.update(float(global_mean(b["kl"])), len(rows) * world_size())
        self.log_dict({
            "objective/kl": kl, "objective/scores": b["scores"].mean(),
            "objective/rlhf_reward": (b["scores"] - beta * b["kl"]).mean(), "objective/kl_coef": beta,
            "objective/entropy": b["neg_logp"].mean(), "objective/response_length": b["lengths"].mean(),
            "objective/eos_rate": b["ended"].mean(),
            "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
            "policy/entropy_avg": avg["entropy"], "loss/policy_avg": avg["pg"], "loss/value_avg": avg["vf"],
            "val/ratio": avg["ratio"], "val/clipfrac_avg": avg["vclipfrac"],
            "lr": self.lr_schedulers().get_last_lr()[0],
        }, prog_bar=False, sync_dist=True)  # every rank's share holds as many samples: the mean of means is exact
        self.log("train/reward", b["scores"].mean(), prog_bar=True, sync_dist=True)
        self.log("train/kl", kl, prog_bar=True, sync_dist=True)
        log_times(self, started, sampled, clock(self.device))


def train(cfg: PipelineConfig, acfg: Config, spec: StageSpec, policy: GPT, reference: GPT,
          tok: ChatTokenizer, callbacks: list | None = None) -> tuple[CurveRecorder, dict, GPT | None]:
    reward_model = load_reward_model(policy.config, tok.sha256, REWARD)
    critic = load_reward_model(policy.config, tok.sha256, REWARD).drop_likelihood_term()  # TRL's default start
    module = PPO(policy.train(), reference, critic.train(), reward_model, tok, acfg, cfg.seed)
    data = PromptData(paths.PREPARED, acfg.rollout_batch, acfg.steps + acfg.critic_warmup, cfg.seed)
    trainer, curves, _ = fit(module, data, cfg, spec, callbacks=callbacks, validate=False, max_epochs=1, log_every=1)
    return curves, {"iterations": acfg.steps}, trained_module(trainer, module, "policy", gpt_like(policy))
