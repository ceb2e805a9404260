"""Log-probabilities a model gives to response tokens: what DPO, the RL objectives and the reward model's
likelihood term are built on."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.gpt import GPT


def response_logprobs(model: GPT, seq: torch.Tensor, attn: torch.Tensor, P: int, with_entropy: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) of each response token (B,R) of a packed [prompt | response] batch
    (pipeline.inference.sequences) and, optionally, the entropy of each step's distribution.

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


def packed_sequence_logprobs(model: GPT, input_ids: torch.Tensor, document_ids: torch.Tensor,
                             response_mask: torch.Tensor, sequence_ids: torch.Tensor, n: int) -> torch.Tensor:
    """`sequence_logprobs` of packed rows (pipeline.data.packing): the sums (n,) of log p(token | prefix) over the
    tokens `response_mask` (R, W) marks, gathered by `sequence_ids` (R, W; -1 off every sequence). A response never
    opens its document, so each token's prefix lies in its own document."""
    logits = model(input_ids[:, :-1], document_ids=document_ids[:, :-1])
    logp = F.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ids = sequence_ids[:, 1:]
    take = (response_mask[:, 1:] > 0) & (ids >= 0)
    return torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, ids[take], logp[take])


def packed_keys(batch: dict) -> dict[str, torch.Tensor]:
    """What a packed batch adds for the models (`document_ids`, `sequence_ids`); nothing for a padded one."""
    return {k: batch[k] for k in ("document_ids", "sequence_ids") if k in batch}
