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
POSITIONAL_ENCODINGS = ("learned", "sinusoidal")
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`
HF_PREFIX = "hf:"


class GPTConfig(Schema):
    """Shape of the network; names follow GPT-2/nanoGPT."""

    where = "model"

    vocab_size: Positive = 512
    """Size of the token table (the tokenizer's vocabulary, possibly padded up)."""
    block_size: Positive = 128
    """Longest sequence the model attends over (context length T)."""
    n_layer: Positive = 4
    """Number of transformer blocks."""
    n_head: Positive = 4
    """Attention heads per block; n_embd must divide evenly among them."""
    n_embd: Positive = 128
    """Width of the residual stream (d_model)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on attention weights, residual branches and embeddings, in [0, 1)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    pos_encoding: Literal["learned", "sinusoidal"] = "learned"
    """`learned` (a trained position table) or `sinusoidal` (the fixed sin/cos formula)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """The MLP's GELU: `gelu` (exact, erf) or `gelu_tanh` (the tanh approximation OpenAI's GPT-2 used)."""

    @model_validator(mode="after")
    def _heads_divide_the_width(self):
        if self.n_embd % self.n_head:
            fits = max(h for h in range(1, self.n_head + 1) if self.n_embd % h == 0)
            raise ValueError(f"@.n_embd ({self.n_embd}) must be divisible by @.n_head ({self.n_head}): set "
                             f"@.n_head to a divisor of n_embd (e.g. {fits}) or @.n_embd to a multiple of n_head "
                             f"(e.g. {-(-self.n_embd // self.n_head) * self.n_head})")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"@.n_embd ({self.n_embd}) must be even for sinusoidal positions")
        return self

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
        """The GPTConfig for a tokenizer of `tokenizer_vocab` tokens (vocab_size filled in and checked)."""
        vocab = self.vocab_size or -(-tokenizer_vocab // self.vocab_multiple) * self.vocab_multiple
        if vocab < tokenizer_vocab:
            raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's {tokenizer_vocab} "
                             "tokens: set it to null to follow the tokenizer")
        fields = self.model_dump(include=set(GPTConfig.model_fields))
        return GPTConfig(**{**fields, "vocab_size": vocab})
