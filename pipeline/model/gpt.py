"""A decoder-only GPT, written bottom-up as the attention papers describe it.

Embedding → positional encoding → N pre-LayerNorm blocks (multi-head causal self-attention
softmax(QKᵀ/√d_head)V, then a GELU MLP, each added to the residual stream) → final LayerNorm →
a language-model head tied to the token embedding. Positions are either learned (GPT-2) or the
fixed sinusoids of "Attention Is All You Need"; both are added to the token embedding.

The same module serves every stage: pretraining and SFT read `forward` logits, the reward model and
PPO value head read `hidden` states, and the sampler passes a `KVCache` plus explicit positions so
batched, left-padded prompts decode exactly like unpadded ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pipeline.config.model import ACTIVATIONS, GPTConfig
from pipeline.model.kv_cache import KVCache


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees itself and the past only."""

    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # Q, K, V in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        drop = self.dropout if self.training else 0.0
        if attn_mask is None:  # plain causal: lets SDPA pick its fused kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, a stack of blocks, and a tied LM head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:  # a buffer, not a parameter: the formula is fixed, and it is saved with the weights
            self.register_buffer("pe", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)
        self.activation_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so depth doesn't blow up the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12·L·d·T for attention.

        N counts non-embedding parameters plus the tied LM head (its matmul runs every token);
        the attention term is QKᵀ and the weighted sum of V over a context of T tokens (PaLM, app. B).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - self.wte.weight.numel() + cfg.vocab_size * cfg.n_embd
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * T

    def position_embedding(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.config.pos_encoding == "learned":
            return self.wpe(position_ids)
        return self.pe[position_ids]

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, n_embd).

        attention_mask: (B, T) bool/0-1, False on left padding. position_ids: (B, T); by default
        counted from the first real token of each row (so padding does not shift positions).
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        valid = (torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None
                 else attention_mask.bool())
        if position_ids is None:
            if attention_mask is None and past == 0:
                position_ids = torch.arange(T, device=idx.device).expand(B, T)
            else:
                prior = kv_cache.key_mask[:, :past].sum(1, keepdim=True) if past else 0
                position_ids = (prior + valid.long().cumsum(1) - 1).clamp(min=0)
        attn_mask = None
        if attention_mask is not None or past:
            keys_valid = valid if kv_cache is None else torch.cat([kv_cache.key_mask[:, :past], valid], 1)
            q_pos = torch.arange(past, past + T, device=idx.device)
            k_pos = torch.arange(past + T, device=idx.device)
            causal = k_pos[None, :] <= q_pos[:, None]                       # (T, past+T)
            attn_mask = causal[None, None] & keys_valid[:, None, None, :]    # (B, 1, T, past+T)
            # a padding query row would see no key at all (softmax of all -inf = NaN): let it see itself
            attn_mask = attn_mask | (k_pos[None, :] == q_pos[:, None])[None, None]
        x = self.drop(self.wte(idx) + self.position_embedding(position_ids))
        for block in self.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(valid)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden(idx, **kwargs))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        p = self.wte.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.n_embd // cfg.n_head,
                       max_len or cfg.block_size, p.device, p.dtype)
