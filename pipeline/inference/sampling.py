"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; the model derives per-row positions from the attention mask, so padding changes nothing.
Each step feeds one token per row and reuses the cached keys/values of everything before it.
`use_cache=False` recomputes the full sequence each step (the reference the cache is tested against).

Per step the logits go through, in order: repetition penalty (every token already in the row, prompt
included, CTRL-style: positive logits divided by the penalty, negative ones multiplied), temperature,
top-k, top-p; temperature 0 takes the argmax of the penalised logits.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from pipeline.model.gpt import GPT


@dataclass
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens already in the row

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature ({self.temperature}) and top_k ({self.top_k}) must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token marked in `seen` (B, V) less likely by `penalty` (> 1), whatever its sign."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, stop_id: int | Collection[int] | None,
             pad_id: int, use_cache: bool = True, generator: torch.Generator | None = None,
             on_step: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """Sample a continuation for each prompt; each stops after emitting a stop token (`stop_id`: one id
    or several; the stop token is kept) or at max_new_tokens.

    `on_step`, if given, receives each step's new token of every row (pad for finished rows): streaming.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B = len(prompts)
    stops = torch.tensor(sorted({stop_id} if isinstance(stop_id, int) else set(stop_id or ())), dtype=torch.long,
                         device=device)
    budget = min(cfg.max_new_tokens, model.config.block_size - ids.size(1))
    if budget <= 0:
        raise ValueError(f"prompt of {ids.size(1)} tokens leaves no room in block_size {model.config.block_size}")
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, ids.size(1) + budget) if use_cache else None
    out = torch.full((B, budget), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask)
    step_ids, step_mask = ids, mask
    for t in range(budget):
        if use_cache:
            logits = model(step_ids, attention_mask=step_mask, kv_cache=cache)[:, -1]
        else:
            logits = model(ids, attention_mask=mask)[:, -1]
        if seen is not None:
            logits = penalize_repetition(logits.float(), seen, cfg.repetition_penalty)
        if cfg.temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        if on_step is not None:
            on_step(nxt.tolist())
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] |= ~done
        stopped = torch.isin(nxt, stops) & ~done
        step_ids, step_mask = nxt[:, None], ~done[:, None]
        done |= stopped
        ids, mask = torch.cat([ids, step_ids], 1), torch.cat([mask, step_mask], 1)
        if done.all():
            break
    model.train(was_training)
    stop_set = set(stops.tolist())
    results = []
    for row in out.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_set), len(row))
        results.append(row[:end])
    return results
