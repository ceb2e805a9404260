"""The model's shape (`GPTConfig`, what a checkpoint records) and the `model` config group (`ModelConfig`).

`ModelConfig` is what conf/model/*.yaml holds: the shape with `vocab_size: null` meaning "the tokenizer's
vocabulary, padded up to `vocab_multiple`", and `init_from`, where the weights start. `shape(vocab)`
turns it into the `GPTConfig` a `GPT` is built from and a checkpoint's meta.json records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema import Schema

Positive = Annotated[int, Field(gt=0)]
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`
HF_PREFIX = "hf:"


class RopeScaling(Schema):
    """Llama 3.1's frequency-dependent RoPE scaling (what `rope_scaling` holds in a Llama 3.x config.json)."""

    where = "model.rope_scaling"

    rope_type: Literal["llama3"] = "llama3"
    """The scaling rule; `llama3` is the only one the pipeline computes."""
    factor: Annotated[float, Field(gt=0)] = 8.0
    """Long wavelengths are divided by this."""
    low_freq_factor: Annotated[float, Field(gt=0)] = 1.0
    high_freq_factor: Annotated[float, Field(gt=0)] = 4.0
    original_max_position_embeddings: Positive = 8192
    """The context the frequencies were first trained at."""


class GPTConfig(Schema):
    """Shape of the network. Names follow GPT-2/nanoGPT; the switches after `activation` cover the Llama family
    (Llama, Mistral, Qwen2, SmolLM): rotary positions, RMSNorm, SwiGLU, grouped-query attention, per-projection
    biases and untied embeddings. Defaults are GPT-2's."""

    where = "model"

    vocab_size: Positive = 512
    """Size of the token table (the tokenizer's vocabulary, possibly padded up)."""
    block_size: Positive = 128
    """Longest sequence the model attends over (context length T)."""
    n_layer: Positive = 4
    """Number of transformer blocks."""
    n_head: Positive = 4
    """Attention (query) heads per block; n_embd must divide evenly among them unless head_dim is set."""
    n_embd: Positive = 128
    """Width of the residual stream (d_model)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on attention weights, residual branches and embeddings, in [0, 1)."""
    bias: bool = True
    """Biases in the Linear and LayerNorm layers (GPT-2 has them); qkv_bias, o_bias and mlp_bias override it."""
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "learned"
    """`learned` (a trained position table, GPT-2), `sinusoidal` (the fixed sin/cos table of "Attention Is All
    You Need", added to the embedding) or `rope` (rotary: queries and keys rotated by position, Llama)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """The GELU of `mlp: gelu`: `gelu` (exact, erf) or `gelu_tanh` (the tanh approximation OpenAI's GPT-2 used)."""
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    """RoPE's base: pair i of a head rotates at rope_theta^(-2i/head_dim) radians per position."""
    rope_scaling: RopeScaling | None = None
    """null, or Llama 3.1's long-context frequency scaling."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """`layernorm` (GPT-2) or `rmsnorm` (Llama: no mean, no bias)."""
    norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """The normalisation's epsilon."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """`gelu`: up, GELU, down (GPT-2); `swiglu`: down(silu(gate(x)) * up(x)) (Llama)."""
    intermediate_size: Positive | None = None
    """The MLP's hidden width; null = 4 * n_embd."""
    n_kv_head: Positive | None = None
    """Key/value heads (grouped-query attention; 1 = multi-query); null = n_head. Must divide n_head."""
    head_dim: Positive | None = None
    """Width of one head; null = n_embd / n_head."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections (Qwen2 has them); null = `bias`."""
    o_bias: bool | None = None
    """A bias on the attention's output projection; null = `bias`."""
    mlp_bias: bool | None = None
    """Biases in the MLP; null = `bias`."""
    tie_embeddings: bool = True
    """The LM head shares the token embedding's weights (GPT-2, Qwen2.5-0.5B, SmolLM2); false: its own matrix."""
    architecture: Literal["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"] | None = None
    """The transformers architecture the model exports as (set by `init_from` to the checkpoint's); null = the
    one its switches describe (pipeline/interop/hf.py)."""

    @model_validator(mode="after")
    def _heads_divide_the_width(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            fits = max(h for h in range(1, self.n_head + 1) if self.n_embd % h == 0)
            raise ValueError(f"@.n_embd ({self.n_embd}) must be divisible by @.n_head ({self.n_head}): set "
                             f"@.n_head to a divisor of n_embd (e.g. {fits}) or @.n_embd to a multiple of n_head "
                             f"(e.g. {-(-self.n_embd // self.n_head) * self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"@.n_kv_head ({self.n_kv_head}) must divide @.n_head ({self.n_head}): each key/value "
                             "head serves an equal group of query heads")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"@.n_embd ({self.n_embd}) must be even for sinusoidal positions")
        if self.pos_encoding == "rope" and self.dim_per_head % 2:
            raise ValueError(f"the head width ({self.dim_per_head}) must be even for rotary positions: "
                             "set @.head_dim or @.n_head so it is")
        if self.rope_scaling is not None and self.pos_encoding != "rope":
            raise ValueError(f"@.rope_scaling is set but @.pos_encoding is {self.pos_encoding!r}: set "
                             "@.pos_encoding=rope or @.rope_scaling=null")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width."""
        return self.intermediate_size or 4 * self.n_embd

    def has_bias(self, part: Literal["qkv", "o", "mlp", "norm"]) -> bool:
        """Whether that part has biases (RMSNorm never does)."""
        if part == "norm":
            return self.bias and self.norm == "layernorm"
        own = {"qkv": self.qkv_bias, "o": self.o_bias, "mlp": self.mlp_bias}[part]
        return self.bias if own is None else own

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """A checkpoint's recorded shape (meta.json `model`), checked like the config group."""
        return cls.parse(d)


class ModelConfig(GPTConfig):
    """The `model` config group (conf/model/*.yaml): the shape, sized to the tokenizer, and where weights start."""

    vocab_size: Positive | None = None
    """null: the tokenizer's vocabulary, padded up to a multiple of `vocab_multiple`."""
    vocab_multiple: Positive = 64
    """Pad the vocabulary up to a multiple of this (64: tensor-core friendly matmuls)."""
    init_from: str | None = None
    """null: random initialisation; `hf:/path/to/dir`: a local transformers checkpoint (pipeline.interop.hf)."""

    @field_validator("init_from")
    @classmethod
    def _hf_dir(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith(HF_PREFIX) or len(value) == len(HF_PREFIX)):
            raise ValueError("it must be null or hf:/path/to/dir (a local transformers checkpoint directory)")
        return value

    def init_dir(self) -> Path | None:
        """The directory `init_from` names (None when null); FileNotFoundError unless it is one."""
        if self.init_from is None:
            return None
        path = Path(self.init_from[len(HF_PREFIX):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model.init_from: {path} is not a directory (a transformers checkpoint "
                                    "saved with save_pretrained: config.json, weights, tokenizer.json)")
        return path

    def shape(self, tokenizer_vocab: int) -> GPTConfig:
        """The GPTConfig for a tokenizer of `tokenizer_vocab` tokens (vocab_size filled in and checked). With
        `init_from` the checkpoint's config.json decides the shape instead (pipeline.interop.hf.model_shape)."""
        vocab = self.vocab_size or -(-tokenizer_vocab // self.vocab_multiple) * self.vocab_multiple
        if vocab < tokenizer_vocab:
            raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's {tokenizer_vocab} "
                             "tokens: set it to null to follow the tokenizer")
        fields = self.model_dump(include=set(GPTConfig.model_fields))
        return GPTConfig(**{**fields, "vocab_size": vocab})
