"""Key/value cache for incremental decoding.

One preallocated tensor pair per layer, shape (B, n_kv_head, max_len, head_dim). All rows advance
together (prompts are left-padded), so a single integer `length` says how much is filled; a boolean
`key_mask` (B, max_len) marks which cached positions are real tokens rather than left padding.
"""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values for a batch being decoded token by token."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return everything cached so far for it."""
        t = k.size(2)
        end = self.length + t
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, valid: torch.Tensor) -> None:
        """Mark `valid` (B, t) as the padding mask of the t positions just written, and move on."""
        t = valid.size(1)
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {t} > max_len {self.max_len}")
        self.key_mask[:, self.length:self.length + t] = valid
        self.length += t
