"""A GPT read out to one number per sequence: the Bradley-Terry reward model and the PPO critic.

The reward model is the SFT backbone plus a scalar head read at the last real token;
P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022), trained by
`pipeline.training.reward`.

With `likelihood_term` on, the score adds a learned multiple of the response's log-likelihood under
a frozen copy of the SFT model it starts from: r = head(h_last) + s * sum_t log p_sft(y_t | x, y_<t).
A scalar head read at one position must rediscover, through attention, whether each answer digit is
the one the SFT model would have written; the likelihood hands it that signal directly (near-miss
corruptions such as an answer off by one are the pairs it decides). The copy stays frozen so the
term keeps meaning "what SFT believes" while the trained backbone drifts toward ranking.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pipeline.model.gpt import GPT
from pipeline.model.logprobs import packed_sequence_logprobs, sequence_logprobs


class ScalarHead(nn.Module):
    """A GPT backbone read out to one number per sequence (reward model, PPO critic)."""

    frozen = ("frozen_lm",)  # in eval mode while the head trains (pipeline.training.objective.Objective.frozen)

    def __init__(self, backbone: GPT, likelihood_term: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        if backbone.lm_head.weight is not backbone.wte.weight:  # untied: the score never reads the LM head, and a
            backbone.lm_head.requires_grad_(False)               # trainable parameter without a gradient stalls DDP
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.likelihood_term = likelihood_term
        if likelihood_term:  # a critic has neither: an unused parameter would trouble DDP
            self.lm_scale = nn.Parameter(torch.ones(1))  # 1-D: FSDP2 cannot shard a 0-d parameter
            self.frozen_lm = copy.deepcopy(backbone).requires_grad_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "lm_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # a checkpoint from before lm_scale was 1-D
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def drop_likelihood_term(self) -> ScalarHead:
        """Keep only backbone + head (a PPO critic starts from the reward model this way)."""
        if self.likelihood_term:
            del self.frozen_lm, self.lm_scale
            self.likelihood_term = False
        return self

    def per_token(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A value for every position (B, T)."""
        return self.head(self.backbone.hidden(idx, attention_mask=attention_mask)).squeeze(-1)

    def forward(self, idx: torch.Tensor, last: torch.Tensor, attention_mask: torch.Tensor | None = None,
                response_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The score of each row (B,): the head at index `last` (+ the likelihood term, see module doc).

        response_mask (B, T) marks the response tokens of `idx`; the likelihood term needs it. Packed rows
        (pipeline.data.packing) pass `document_ids` and `sequence_ids`; `last` then indexes the flattened rows,
        one score per sequence.
        """
        if document_ids is not None:
            h = self.backbone.hidden(idx, document_ids=document_ids)
            score = self.head(h).squeeze(-1).flatten()[last]
        else:
            h = self.backbone.hidden(idx, attention_mask=attention_mask)
            score = self.head(h).squeeze(-1).gather(1, last[:, None]).squeeze(1)
        if self.likelihood_term:
            if response_mask is None:
                raise ValueError("this reward model has a likelihood term: pass response_mask")
            with torch.no_grad():
                if document_ids is not None:
                    loglik = packed_sequence_logprobs(self.frozen_lm, idx, document_ids, response_mask,
                                                      sequence_ids, last.numel())
                else:
                    loglik = sequence_logprobs(self.frozen_lm, idx, response_mask, attention_mask)
            score = score + self.lm_scale * loglik
        return score
