"""Checkpoints handed from stage to stage by name, never by a path typed into code.

Each checkpoint is a directory `artifacts/<name>/` holding `model.safetensors` (weights only:
loading can't execute code) and `meta.json` (which stage wrote it, the model config, the SHA-256 of
the tokenizer it was trained with, the step and the run id). Loading checks the stage kind and the
tokenizer hash and refuses a mismatch with a message saying what to rerun.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from pipeline.io import atomic_dir, read_json, write_json
from pipeline.model import GPT, GPTConfig

ARTIFACTS = Path("artifacts")
CHECKPOINTS = {"pretrain": "pretrain", "sft": "sft", "sft_control": "sft_control", "reward": "reward", "aligned": "aligned"}
TOKENIZER_FILE = ARTIFACTS / "tokenizer" / "tokenizer.json"
PRODUCER = {"pretrain": "pretrain", "sft": "sft", "sft_control": "sft_control", "reward": "reward", "aligned": "align"}


def checkpoint_dir(name: str, root: str | Path = ".") -> Path:
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {sorted(CHECKPOINTS)}")
    return Path(root) / ARTIFACTS / CHECKPOINTS[name]


def save_checkpoint(name: str, model: torch.nn.Module, meta: dict, root: str | Path = ".") -> Path:
    """Write `model` and `meta` as checkpoint `name`, atomically."""
    out = checkpoint_dir(name, root)
    with atomic_dir(out) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        write_json(tmp / "meta.json", {"name": name, **meta})
    return out


def read_meta(name: str, root: str | Path = ".") -> dict:
    d = checkpoint_dir(name, root)
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint {name!r} not found in {d}: run `dvc repro {PRODUCER[name]}` first")
    return read_json(d / "meta.json")


def check_tokenizer(meta: dict, tokenizer_sha256: str | None) -> None:
    if tokenizer_sha256 and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"checkpoint {meta.get('name')!r} was trained with tokenizer {meta.get('tokenizer_sha256', '?')[:12]}, "
            f"but {TOKENIZER_FILE} is {tokenizer_sha256[:12]}: rerun the stages after `tokenizer` (dvc repro)")


def load_gpt(name: str, tokenizer_sha256: str | None = None, root: str | Path = ".") -> tuple[GPT, dict]:
    """Load a language-model checkpoint (pretrain, sft, sft_control, aligned) in eval mode."""
    meta = read_meta(name, root)
    if meta.get("kind") != "gpt":
        raise ValueError(f"checkpoint {name!r} holds a {meta.get('kind')!r}, not a language model")
    check_tokenizer(meta, tokenizer_sha256)
    model = GPT(GPTConfig.from_dict(meta["model"]))
    load_model(model, str(checkpoint_dir(name, root) / "model.safetensors"))
    return model.eval(), meta


def load_into(name: str, module: torch.nn.Module, kind: str, tokenizer_sha256: str | None = None,
              root: str | Path = ".") -> dict:
    """Load checkpoint `name` of `kind` into an already built `module`; return its meta."""
    meta = read_meta(name, root)
    if meta.get("kind") != kind:
        raise ValueError(f"checkpoint {name!r} holds a {meta.get('kind')!r}, expected {kind!r}")
    check_tokenizer(meta, tokenizer_sha256)
    load_model(module, str(checkpoint_dir(name, root) / "model.safetensors"))
    return meta
