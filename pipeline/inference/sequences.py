"""Prompt + response batches for scoring: [left-padded prompt | right-padded response].

Every prompt then ends at column P-1 and every response starts at column P; the model gets positions
from the attention mask, so padding on either side changes no logit. RL rollouts, the reward model's
scores in evaluation and the KL to a reference are all computed on this layout.
"""
from __future__ import annotations

import torch

from pipeline.inference.sampling import left_pad


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


def response_positions(response_mask: torch.Tensor, P: int) -> torch.Tensor:
    """The (B, P+R) float mask of response tokens in a packed sequence."""
    return torch.cat([response_mask.new_zeros(response_mask.size(0), P), response_mask], 1).float()
