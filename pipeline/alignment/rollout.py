"""The toolkit the RL methods share: sample a rollout, score it, masked statistics, GAE, the clipped surrogate, KL
estimates.

A rollout batch is laid out as [left-padded prompt | right-padded response] (pipeline.inference.sequences),
its per-token log-probabilities come from pipeline.model.logprobs.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from pipeline.config.align import MethodConfig
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.inference.sequences import build_sequences, response_positions
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import response_logprobs
from pipeline.training.parallel import global_mean, world_size

if TYPE_CHECKING:
    from pipeline.model.heads import ScalarHead


class RolloutConfig(MethodConfig):
    """The sampling settings of an online method's rollouts."""

    max_new_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    """0 = off."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """1 = off."""

    def answer_budgets(self) -> dict[str, int]:
        return {"max_new_tokens": self.max_new_tokens}


@torch.no_grad()
def sample_rollout(policy: GPT, tok, rows: list[dict], cfg: RolloutConfig, generator: torch.Generator | None,
                   device: torch.device | str) -> dict:
    """Sample one response per row's prompt (KV cache, stop at <|end|>) and pack the batch.

    `cfg` carries max_new_tokens, temperature, top_k, top_p. Returns responses (token lists),
    seq/attn/mask/P as `build_sequences`, the sampling log-probs `logp` (B,R) at that temperature,
    `ended` (B,) and `lengths` (B,).
    """
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    prompts = [tok.prompt(r["prompt"]) for r in rows]
    responses = generate(policy, prompts, sampling, stop_id=tok.end_id, pad_id=tok.pad_id, generator=generator)
    seq, attn, mask, P = build_sequences(prompts, responses, tok.pad_id, device)
    logp, _ = response_logprobs(policy, seq, attn, P, temperature=cfg.temperature)
    ended = torch.tensor([float(tok.end_id in r) for r in responses], device=device)
    return {"responses": responses, "seq": seq, "attn": attn, "mask": mask, "P": P, "logp": logp,
            "ended": ended, "lengths": mask.sum(1)}


@torch.no_grad()
def reward_model_scores(reward_model: ScalarHead, b: dict, missing_eos_penalty: float,
                        score_clip: float) -> torch.Tensor:
    """The frozen reward model's score of each exchange of rollout `b` (`sample_rollout`) at its last token, less
    `missing_eos_penalty` where the response never ended, clipped to +-`score_clip` (0 = off): PPO's scores."""
    last = b["P"] + b["lengths"] - 1
    scores = reward_model(b["seq"], last, b["attn"], response_mask=response_positions(b["mask"], b["P"]))
    scores = scores - missing_eos_penalty * (1 - b["ended"])
    if score_clip:  # trlX's cliprange_reward: one outlier must not dominate the advantages
        scores = scores.clamp(-score_clip, score_clip)
    return scores


def minibatches(n: int, size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """`epochs` shuffled passes over range(n) in index chunks of `size`; the seed fixes every order.

    Under data parallelism `n` is this rank's share of the rollout and `size` the global minibatch: each rank
    takes size / world of its own rows per step, so one optimizer step sees `size` samples in all."""
    world = world_size()
    if size % world:
        raise ValueError(f"the minibatch ({size} samples) does not split over {world} processes: make "
                         f"align.minibatch_size a multiple of trainer.devices x trainer.num_nodes")
    size //= world
    for epoch in range(epochs):
        yield from torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).split(size)


def manual_step(module, loss: torch.Tensor, grad_clip: float) -> None:
    """One optimizer + scheduler step of a LightningModule under manual optimization (online RL)."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    opt.zero_grad(set_to_none=True)
    module.manual_backward(loss)
    module.clip_gradients(opt, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
    opt.step()
    sched.step()


def clock(device: torch.device) -> float:
    """Wall time once `device` has finished the work queued on it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def log_times(module, started: float, sampled: float, done: float) -> None:
    """Log one iteration's seconds spent generating (sampling and scoring the rollout) and training (its updates),
    averaged over the ranks."""
    module.log_dict({"time/generation_s": sampled - started, "time/training_s": done - sampled}, sync_dist=True)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale the masked entries to mean 0, variance 1; the statistics are the whole rollout's, over
    every rank."""
    mean = global_mean(x, mask)
    var = global_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; positions past a row's end are zero."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    R = rewards.size(1)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def group_centre(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Subtract from each score the mean of its group of `k` adjacent siblings (same prompt)."""
    return scores - scores.view(-1, k).mean(1).repeat_interleave(k)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                        cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a per-token loss, max(-A r, -A clip(r, 1-e, 1+e)), and the ratio r.

    `adv` broadcasts against the (B, R) log-probs: per token (PPO's GAE) or per row (GRPO, shape (B, 1)).
    """
    ratio = (logp - old_logp).exp()
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)), ratio


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens: k1 = log r, k3 = (1/r - 1) + log r."""
    logr = logp - ref_logp
    if estimator == "k1":
        return logr
    if estimator == "k3":
        return torch.expm1(-logr) + logr
    raise ValueError(f"align.kl_estimator {estimator!r} is unknown: choose k1 or k3")
