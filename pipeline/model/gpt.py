"""A decoder-only transformer, written bottom-up as the attention papers describe it, with the switches of
the GPT-2 and Llama families.

Embedding → positional information → N pre-norm blocks (multi-head causal self-attention
softmax(QKᵀ/√d_head)V, then an MLP, each added to the residual stream) → final norm → a language-model
head. Every choice is a field of `GPTConfig`:
- positions: learned (GPT-2) or the fixed sinusoids of "Attention Is All You Need", both added to the token
  embedding; or rotary (RoPE, Su et al. 2021: each head's query and key pairs rotated by an angle that grows
  with position, so QKᵀ depends on the distance between tokens), with Llama 3.1's frequency scaling;
- norm: LayerNorm or RMSNorm; MLP: GELU or SwiGLU;
- attention: multi-head, grouped-query or multi-query (`n_kv_head`); Q, K and V are one fused matmul;
- biases per projection (Qwen2 has them on Q, K, V only), and a tied or untied LM head.

The same module serves every stage: pretraining and SFT read `forward` logits, the reward model and
PPO value head read `hidden` states, and the sampler passes a `KVCache` plus explicit positions so
batched, left-padded prompts decode exactly like unpadded ones (rotary positions included).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pipeline.config.model import ACTIVATIONS, GPTConfig
from pipeline.model.kv_cache import KVCache

Rotation = tuple[torch.Tensor, torch.Tensor]  # RoPE's (cos, sin), each (B, T, head_dim)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def rope_frequencies(cfg: GPTConfig) -> torch.Tensor:
    """Angular speed of each rotated pair of a head: theta^(-2i/d), i < d/2, with Llama 3.1's scaling if set.

    The scaling leaves short wavelengths (below context/high_freq_factor) alone, slows long ones (above
    context/low_freq_factor) by `factor`, and blends linearly in between.
    """
    d = cfg.dim_per_head
    freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    s = cfg.rope_scaling
    if s is None:
        return freq
    wavelength = 2 * math.pi / freq
    blend = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blend = blend.clamp(0, 1)
    return (1 - blend) * freq / s.factor + blend * freq


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head of x (B, H, T, d) by their position's angles."""
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rotation)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def norm_layer(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.has_bias("norm"))


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees itself and the past only; `n_kv_head` < `n_head`
    shares each key/value head among a group of query heads (GQA; one head: MQA)."""

    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_per_head
        self.layer_idx = layer_idx
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.widths = [q_width, kv_width, kv_width]
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.widths), bias=cfg.has_bias("qkv"))  # Q, K, V in one matmul
        self.c_proj = nn.Linear(q_width, cfg.n_embd, bias=cfg.has_bias("o"))
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, kv_cache: KVCache | None,
                rotation: Rotation | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.widths, dim=2)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): each head attends in its own subspace
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        drop = self.dropout if self.training else 0.0
        grouped = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        if attn_mask is None:  # plain causal: lets SDPA pick its fused kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, **grouped)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, **grouped)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: up to `intermediate_size`, GELU, back down; or SwiGLU's
    down(silu(gate(x)) * up(x)), where `c_fc` is the up projection and `c_gate` the gate (two matmuls, not one
    fused and split: the halves of a fused output are strided, and SiLU on them runs slower on a CPU)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        width, bias = cfg.hidden_size, cfg.has_bias("mlp")
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=bias)
        if cfg.mlp == "swiglu":
            self.c_gate = nn.Linear(cfg.n_embd, width, bias=bias)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "c_gate"):
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = norm_layer(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = norm_layer(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, rotation: Rotation | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, rotation)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embedding, positions, a stack of blocks, a final norm and an LM head (tied to the embedding or not)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos_encoding == "sinusoidal":  # a buffer, not a parameter: the formula is fixed
            self.register_buffer("pe", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        else:
            self.register_buffer("rope_freq", rope_frequencies(cfg), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = norm_layer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
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
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12·L·H·d_head·T for attention.

        N counts the parameters outside the embedding tables plus the LM head once (its matmul runs every
        token, tied or not); the attention term is QKᵀ and the weighted sum of V over a context of T tokens,
        for every query head (PaLM, app. B): grouped-query attention shares keys, not this work.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - self.wte.weight.numel() + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.dim_per_head * T

    def position_embedding(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.config.pos_encoding == "learned":
            return self.wpe(position_ids)
        return self.pe[position_ids]

    def rotation(self, position_ids: torch.Tensor) -> Rotation:
        """RoPE's (cos, sin) at `position_ids` (B, T), in fp32 whatever the model's dtype."""
        angles = position_ids[..., None].float() * self.rope_freq.float()   # (B, T, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
               document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd).

        attention_mask: (B, T) bool/0-1, False on left padding. position_ids: (B, T); by default
        counted from the first real token of each row (so padding does not shift positions).
        document_ids: (B, T), for packed rows (several documents one after another in a row): a token attends
        only to earlier tokens of its own document, and positions restart at 0 with each document (RoPE and
        learned or sinusoidal positions alike), so each document is computed as if it were alone in its row.
        Under FSDP2 this is an entry point of its own (`register_fsdp_forward_method`), so `forward` calls
        `_hidden`: a nested entry would reshard the weights before the LM head reads them.
        """
        return self._hidden(idx, attention_mask=attention_mask, position_ids=position_ids, kv_cache=kv_cache,
                            document_ids=document_ids)

    def _hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if document_ids is not None:
            if kv_cache is not None:
                raise ValueError("document_ids (packed rows) are for training and scoring, not KV-cache decoding")
            return self._packed(idx, document_ids, attention_mask, position_ids)
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
        x = self._blocks(idx, position_ids, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(valid)
        return self.ln_f(x)

    def _packed(self, idx: torch.Tensor, document_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        """Hidden states of packed rows: a block-diagonal causal mask (no attention across documents) and each
        document's positions from 0. Padding (attention_mask False, or a document id of its own) is computed
        but attends only within itself."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        same = document_ids[:, :, None] == document_ids[:, None, :]                      # (B, T, T)
        attn_mask = (same & (pos[None, :] <= pos[:, None])[None])[:, None]               # (B, 1, T, T)
        if attention_mask is not None:  # padding keys are seen by no real query (a padding query sees itself)
            keys = attention_mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=idx.device)
            attn_mask = attn_mask & keys
        if position_ids is None:
            starts = torch.ones_like(document_ids, dtype=torch.bool)
            starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            first = torch.where(starts, pos.expand(B, T), torch.zeros_like(document_ids)).cummax(1).values
            position_ids = pos[None] - first
        return self.ln_f(self._blocks(idx, position_ids, attn_mask, None))

    def _blocks(self, idx: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor | None,
                kv_cache: KVCache | None) -> torch.Tensor:
        x = self.wte(idx)
        rotation = None
        if self.config.pos_encoding == "rope":
            rotation = self.rotation(position_ids)
        else:
            x = x + self.position_embedding(position_ids)
        x = self.drop(x)
        for block in self.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, None, rotation, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache, rotation)
        return x

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size)."""
        return self.lm_head(self._hidden(idx, **kwargs))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        p = self.wte.weight
        return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, cfg.dim_per_head, max_len or cfg.block_size,
                       p.device, p.dtype)
