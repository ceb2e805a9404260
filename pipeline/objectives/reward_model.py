"""Bradley-Terry reward model: the SFT backbone plus a scalar head read at the last real token.

P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the loss is -log of it (Ouyang et al.
2022). Metrics use TRL's names: accuracy (share of pairs ranked right), margin (mean r_c - r_r),
mean_reward.

With `likelihood_term` on, the score adds a learned multiple of the response's log-likelihood under
a frozen copy of the SFT model it starts from: r = head(h_last) + s * sum_t log p_sft(y_t | x, y_<t).
A scalar head read at one position must rediscover, through attention, whether each answer digit is
the one the SFT model would have written; the likelihood hands it that signal directly (near-miss
corruptions such as an answer off by one are the pairs it decides). The copy stays frozen so the
term keeps meaning "what SFT believes" while the trained backbone drifts toward ranking.

On-policy pairs: as in InstructGPT, where labelers rank the model's own outputs, `on_policy_pairs`
samples the SFT policy on training prompts and pairs each wrong sample (judged by the generator's
checker, the reliable labeler here) with the correct answer, so the reward model also learns the
mistakes the policy actually makes, not only the synthetic corruptions.

This module is the model and its data (no Lightning: evaluation imports it); the training objective
is `pipeline.objectives.reward.RewardModeling`.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model import GPT
from pipeline.objectives.rollout import sequence_logprobs

if TYPE_CHECKING:
    from pipeline.data.tokenizer import ChatTokenizer


class ScalarHead(nn.Module):
    """A GPT backbone read out to one number per sequence (reward model, PPO critic)."""

    def __init__(self, backbone: GPT, likelihood_term: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.likelihood_term = likelihood_term
        if likelihood_term:  # a critic has neither: an unused parameter would trouble DDP
            self.lm_scale = nn.Parameter(torch.ones(()))
            self.frozen_lm = copy.deepcopy(backbone).requires_grad_(False).eval()

    def drop_likelihood_term(self) -> "ScalarHead":
        """Keep only backbone + head (a PPO critic starts from the reward model this way)."""
        if self.likelihood_term:
            del self.frozen_lm, self.lm_scale
            self.likelihood_term = False
        return self

    def per_token(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A value for every position (B, T)."""
        return self.head(self.backbone.hidden(idx, attention_mask=attention_mask)).squeeze(-1)

    def forward(self, idx: torch.Tensor, last: torch.Tensor, attention_mask: torch.Tensor | None = None,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The score of each row (B,): the head at index `last` (+ the likelihood term, see module doc).

        response_mask (B, T) marks the response tokens of `idx`; the likelihood term needs it.
        """
        h = self.backbone.hidden(idx, attention_mask=attention_mask)
        score = self.head(h).squeeze(-1).gather(1, last[:, None]).squeeze(1)
        if self.likelihood_term:
            if response_mask is None:
                raise ValueError("this reward model has a likelihood term: pass response_mask")
            with torch.no_grad():
                loglik = sequence_logprobs(self.frozen_lm, idx, response_mask, attention_mask)
            score = score + self.lm_scale * loglik
        return score


def pairwise_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = r_chosen - r_rejected
    return {"loss": -F.logsigmoid(margin).mean(), "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean(), "mean_reward": torch.cat([r_chosen, r_rejected]).mean()}


def load_reward_model(config, tokenizer_sha256: str | None = None) -> ScalarHead:
    """The `reward` checkpoint as a ScalarHead (with the likelihood term if it was trained with one)."""
    from pipeline.checkpoint import load_into, read_meta

    model = ScalarHead(GPT(config), likelihood_term=bool(read_meta("reward").get("likelihood_term", False)))
    load_into("reward", model, "reward", tokenizer_sha256)
    return model


@torch.no_grad()
def on_policy_pairs(policy: GPT, tok: "ChatTokenizer", rows: list[dict], samples: int, max_new_tokens: int,
                    temperature: float, seed: int, batch_size: int = 256) -> list[dict]:
    """Preference rows (chosen = reference answer, rejected = a wrong sample of `policy`), one per distinct error."""
    from rich.progress import track

    from pipeline.data.tasks import check
    from pipeline.inference.sampling import SamplingConfig, generate

    g = torch.Generator(device=policy.wte.weight.device).manual_seed(seed)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    repeated = [r for r in rows for _ in range(samples)]
    out, seen = [], set()
    for i in track(range(0, len(repeated), batch_size), description="sampling on-policy pairs", transient=True):
        chunk = repeated[i:i + batch_size]
        responses = generate(policy, [tok.prompt(r["prompt"]) for r in chunk], cfg, stop_id=tok.end_id,
                             pad_id=tok.pad_id, generator=g)
        for row, resp in zip(chunk, responses):
            text = tok.decode(tok.strip_response(resp))
            ended = tok.end_id in resp
            if (ended and check(row["answer"], text)) or (row["key"], text, ended) in seen:
                continue
            seen.add((row["key"], text, ended))
            out.append({"prompt": row["prompt"], "chosen": row["answer"], "rejected": text, "rejected_has_end": ended,
                        "corruption": "on_policy", "family": row["family"], "key": row["key"]})
    return out
