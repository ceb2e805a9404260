"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; the model derives per-row positions from the attention mask, so padding changes nothing.
Each step feeds one token per row and reuses the cached keys/values of everything before it.
`use_cache=False` recomputes the full sequence each step (the reference the cache is tested against).

Per step the logits go through, in order: repetition penalty (every token already in the row, prompt
included, CTRL-style: positive logits divided by the penalty, negative ones multiplied), temperature,
top-k, top-p; temperature 0 takes the argmax of the penalised logits.

Whether every row has stopped is a host sync; on an accelerator it is asked every `SYNC_EVERY` steps
(on a CPU, or when streaming with `on_step`, which reads every step anyway, every step), so the host can
queue steps ahead of the device. The steps run past the last stop only write padding, and the random
generator is rewound to where a check every step would have left it: the tokens, and the generator's
state for the next call, are those of a check every step.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from pipeline.model.gpt import GPT

SYNC_EVERY = 8  # steps between "has every row stopped?" checks on an accelerator


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


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of the generator that samples chunk `chunk` of a fixed list of prompts: its samples do not
    depend on which device draws it, or after which chunks (evaluate, on-policy pairs)."""
    return (seed * 1_000_003 + chunk) % 2**63


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


def default_generator(device: torch.device) -> torch.Generator | None:
    """The generator `torch.multinomial(..., generator=None)` draws from on `device` (None: not reachable)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, stop_id: int | Collection[int] | None,
             pad_id: int, use_cache: bool = True, generator: torch.Generator | None = None,
             on_step: Callable[[list[int]], None] | None = None, sync_every: int | None = None) -> list[list[int]]:
    """Sample a continuation for each prompt; each stops after emitting a stop token (`stop_id`: one id
    or several; the stop token is kept) or at max_new_tokens.

    `on_step`, if given, receives each step's new token of every row (pad for finished rows): streaming.
    `sync_every`: steps between checks that every row has stopped (default: see the module docstring);
    it changes no token.
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
    sampling = cfg.temperature > 0
    rng = (generator if generator is not None else default_generator(device)) if sampling else None
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" or on_step is not None else SYNC_EVERY
    if sampling and rng is None:
        sync_every = 1  # a generator that cannot be rewound: stop exactly where a check every step would
    rewind = sampling and sync_every > 1
    states: list[torch.Tensor] = []  # the generator's state after each step since the last check
    stop_step = torch.full((B,), -1, dtype=torch.long, device=device)  # the step each row stopped at
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
            if rewind:
                states.append(rng.get_state())
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        if on_step is not None:
            on_step(nxt.tolist())
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] |= ~done
        stopped = torch.isin(nxt, stops) & ~done
        if rewind:
            stop_step.masked_fill_(stopped, t)
        step_ids, step_mask = nxt[:, None], ~done[:, None]
        done |= stopped
        ids, mask = torch.cat([ids, step_ids], 1), torch.cat([mask, step_mask], 1)
        if (t + 1) % sync_every and t + 1 < budget:
            continue
        if done.all():
            if rewind:  # back to the state after the step the last row stopped at
                rng.set_state(states[int(stop_step.max()) - (t + 1 - len(states))])
            break
        states.clear()
    model.train(was_training)
    stop_set = set(stops.tolist())
    results = []
    for row in out.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_set), len(row))
        results.append(row[:end])
    return results
