"""The toolkit RL methods share: pack prompt+response batches, per-token log-probs, masked stats, GAE.

A rollout batch is laid out as [left-padded prompt | right-padded response], so every prompt ends at
column P-1 and the response starts at column P for every row; the model gets positions from the
attention mask, so padding on either side changes no logit.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pipeline.inference.sampling import SamplingConfig, generate, left_pad
from pipeline.model import GPT


def build_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(seq (B,P+R), attention_mask (B,P+R), response_mask (B,R), P)."""
    p_ids, p_mask = left_pad(prompts, pad_id, device)
    R = max(1, max(len(r) for r in responses))
    r_ids = torch.full((len(responses), R), pad_id, dtype=torch.long, device=device)
    r_mask = torch.zeros(len(responses), R, dtype=torch.bool, device=device)
    for i, r in enumerate(responses):
        if r:
            r_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            r_mask[i, :len(r)] = True
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_mask, p_ids.size(1)


@torch.no_grad()
def sample_rollout(policy: GPT, tok, rows: list[dict], cfg, generator: torch.Generator | None,
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


def response_positions(response_mask: torch.Tensor, P: int) -> torch.Tensor:
    """The (B, P+R) float mask of response tokens in a packed sequence."""
    return torch.cat([response_mask.new_zeros(response_mask.size(0), P), response_mask], 1).float()


def response_logprobs(model: GPT, seq: torch.Tensor, attn: torch.Tensor, P: int, with_entropy: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) of each response token (B,R) and, optionally, the entropy of each step's distribution.

    `temperature` must be the one the tokens were sampled at, so that the log-probs are those of the
    distribution that produced them (as TRL does).
    """
    logits = model(seq, attention_mask=attn)[:, P - 1:-1].float() / max(temperature, 1e-6)
    logp = F.log_softmax(logits, -1)
    lp = logp.gather(-1, seq[:, P:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return lp, entropy


def sequence_logprobs(model: GPT, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of log p(token | prefix) over the tokens `response_mask` (B,T) marks (B,): right-padded rows."""
    logits = model(input_ids[:, :-1], attention_mask=None if attention_mask is None else attention_mask[:, :-1])
    logp = F.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * response_mask[:, 1:]).sum(1)


def minibatches(n: int, size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """`epochs` shuffled passes over range(n) in index chunks of `size`; the seed fixes every order."""
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
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
