"""Checkpoints handed from stage to stage by name, never by a path typed into code.

Each checkpoint is a directory `artifacts/<name>/` holding `model.safetensors` (weights only:
loading can't execute code) and `meta.json` (which stage wrote it, the model config, the SHA-256 of
the tokenizer it was trained with, the step and the run id). Loading checks the stage kind and the
tokenizer hash and refuses a mismatch with a message saying what to rerun; `check_checkpoint` does the
same from meta.json and the weights file's header alone, so a stage can refuse its inputs before any work.
A damaged meta.json or weights file is refused the same way, naming the file and the stage to rerun.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from pipeline.io import atomic_dir, write_json
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
    path = d / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {name!r} not found in {d}: run `dvc repro {PRODUCER[name]}` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged ({err}): rerun `dvc repro {PRODUCER[name]}`") from None
    missing = [key for key in ("kind", "model") if key not in meta] if isinstance(meta, dict) else ["kind", "model"]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a checkpoint's meta.json; rerun "
                         f"`dvc repro {PRODUCER[name]}`")
    return meta


def check_tokenizer(meta: dict, tokenizer_sha256: str | None) -> None:
    if tokenizer_sha256 and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"checkpoint {meta.get('name')!r} was trained with tokenizer {str(meta.get('tokenizer_sha256'))[:12]}, "
            f"but {TOKENIZER_FILE} is {tokenizer_sha256[:12]}: rerun the stages after `tokenizer` (dvc repro)")


def check_checkpoint(name: str, kind: str, tokenizer_sha256: str | None = None, root: str | Path = ".") -> dict:
    """Refuse checkpoint `name` unless it exists, holds a `kind`, comes from this tokenizer and its weights
    file is whole (its header covers the file); reads meta.json and the header only. Returns the meta."""
    meta = read_meta(name, root)
    d = checkpoint_dir(name, root)
    if meta["kind"] != kind:
        what = " (a language model)" if kind == "gpt" else ""
        raise ValueError(f"{d} holds a {meta['kind']!r} checkpoint (written as {meta.get('name')!r}), expected "
                         f"{kind!r}{what} for checkpoint {name!r}: rerun `dvc repro {PRODUCER[name]}`")
    check_tokenizer(meta, tokenizer_sha256)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: rerun `dvc repro {PRODUCER[name]}`")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged ({err}): rerun `dvc repro {PRODUCER[name]}`") from None
    return meta


def _load_weights(name: str, module: torch.nn.Module, root: str | Path) -> None:
    weights = checkpoint_dir(name, root) / "model.safetensors"
    try:
        load_model(module, str(weights))
    except (SafetensorError, RuntimeError) as err:  # damaged, or not the shapes meta.json describes
        raise ValueError(f"{weights} does not load ({err}): rerun `dvc repro {PRODUCER[name]}`") from None


def load_gpt(name: str, tokenizer_sha256: str | None = None, root: str | Path = ".") -> tuple[GPT, dict]:
    """Load a language-model checkpoint (pretrain, sft, sft_control, aligned) in eval mode."""
    meta = check_checkpoint(name, "gpt", tokenizer_sha256, root)
    model = GPT(GPTConfig.from_dict(meta["model"]))
    _load_weights(name, model, root)
    return model.eval(), meta


def load_into(name: str, module: torch.nn.Module, kind: str, tokenizer_sha256: str | None = None,
              root: str | Path = ".") -> dict:
    """Load checkpoint `name` of `kind` into an already built `module`; return its meta."""
    meta = check_checkpoint(name, kind, tokenizer_sha256, root)
    _load_weights(name, module, root)
    return meta
