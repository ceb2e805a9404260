"""What stages share: fixed artifact paths, the tokenizer, model config from Hydra, checkpoint metadata."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.checkpoint import TOKENIZER_FILE
from pipeline.config import run_identity
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.model import GPT, GPTConfig

DATA_DIR = Path("data/prepared")


def load_tokenizer(cfg: DictConfig) -> ChatTokenizer:
    return ChatTokenizer.load(TOKENIZER_FILE, list(cfg.tokenizer.special_tokens))


def gpt_config(cfg: DictConfig, tok: ChatTokenizer) -> GPTConfig:
    """The `model` config group, with vocab_size taken from the tokenizer (padded to vocab_multiple)."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    multiple = int(m.pop("vocab_multiple", 1) or 1)
    m.pop("init_from", None)  # where the weights start (pipeline/hf.py), not the shape
    vocab = m.get("vocab_size") or -(-tok.vocab_size // multiple) * multiple
    if vocab < tok.vocab_size:
        raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's {tok.vocab_size} tokens: "
                         "set it to null to follow the tokenizer")
    m["vocab_size"] = vocab
    return GPTConfig.from_dict(m)


def checkpoint_meta(cfg: DictConfig, tok: ChatTokenizer, model: GPT, kind: str, **extra) -> dict:
    return {"kind": kind, "model": model.config.to_dict(), "tokenizer_sha256": tok.sha256,
            **run_identity(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "n_params": sum(p.numel() for p in model.parameters()), **extra}


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None
