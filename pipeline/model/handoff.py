"""Checkpoints handed from stage to stage by name, never by a path typed into code.

Each checkpoint is a directory `artifacts/<name>/` holding `model.safetensors` (weights only:
loading can't execute code) and `meta.json` (which stage wrote it, the model config, the SHA-256 of
the tokenizer it was trained with, the step and the run id). Loading checks the stage kind and the
tokenizer hash and refuses a mismatch with a message saying what to rerun; `check_checkpoint` does the
same from meta.json and the weights file's header alone, so a stage can refuse its inputs before any work.
A damaged meta.json or weights file is refused the same way, naming the file.

`producer`, where a caller knows it (the chain does: pipeline.registry.Chain.producer), names the stage
to rerun in those messages.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file

from pipeline.config.identity import run_identity
from pipeline.config.model import GPTConfig
from pipeline.io import atomic_dir, write_json
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead
from pipeline.paths import TOKENIZER_FILE, checkpoint_dir

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.data.tokenizer import ChatTokenizer


def _rerun(name: str, producer: str | None) -> str:
    return f"`dvc repro {producer}`" if producer else f"the stage that writes {checkpoint_dir(name)} (`dvc repro`)"


def checkpoint_meta(cfg: Config, tok: ChatTokenizer, model: GPT, kind: str, **extra) -> dict:
    """What a checkpoint records besides its weights: kind, shape, tokenizer, the run that made it."""
    return {"kind": kind, "model": model.config.to_dict(), "tokenizer_sha256": tok.sha256,
            **run_identity(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "n_params": sum(p.numel() for p in model.parameters()), **extra}


def save_checkpoint(name: str, model: torch.nn.Module, meta: dict) -> None:
    """Write `model` and `meta` as checkpoint `name`, atomically."""
    with atomic_dir(checkpoint_dir(name)) as tmp:
        save_file(_untied(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "meta.json", {"name": name, **meta})


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with each tied tensor once, under the first of its names in sorted order, the one
    safetensors' `save_model` keeps (and `load_model` ties back). `save_model` itself also records every dropped
    name in the file's metadata, which the Rust writer orders at random: a model with two tied pairs (the reward
    model with its likelihood term) came out as different bytes from run to run, which DVC takes for a new model."""
    state = model.state_dict()
    tied: dict[object, list[str]] = {}
    for key, tensor in state.items():
        same = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        tied.setdefault(same if tensor.numel() else key, []).append(key)
    return {min(keys): state[min(keys)].contiguous() for keys in tied.values()}


def read_meta(name: str, producer: str | None = None) -> dict:
    d = checkpoint_dir(name)
    path = d / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {name!r} not found in {d}: run {_rerun(name, producer)} first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged ({err}): rerun {_rerun(name, producer)}") from None
    missing = [key for key in ("kind", "model") if key not in meta] if isinstance(meta, dict) else ["kind", "model"]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a checkpoint's meta.json; rerun {_rerun(name, producer)}")
    return meta


def check_tokenizer(meta: dict, tokenizer_sha256: str | None) -> None:
    if tokenizer_sha256 and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"checkpoint {meta.get('name')!r} was trained with tokenizer {str(meta.get('tokenizer_sha256'))[:12]}, "
            f"but {TOKENIZER_FILE} is {tokenizer_sha256[:12]}: rerun the stages after `tokenizer` (dvc repro)")


def check_checkpoint(name: str, kind: str, tokenizer_sha256: str | None = None, producer: str | None = None) -> dict:
    """Refuse checkpoint `name` unless it exists, holds a `kind`, comes from this tokenizer and its weights
    file is whole (its header covers the file); reads meta.json and the header only. Returns the meta."""
    meta = read_meta(name, producer)
    d = checkpoint_dir(name)
    if meta["kind"] != kind:
        what = " (a language model)" if kind == "gpt" else ""
        raise ValueError(f"{d} holds a {meta['kind']!r} checkpoint (written as {meta.get('name')!r}), expected "
                         f"{kind!r}{what} for checkpoint {name!r}: rerun {_rerun(name, producer)}")
    check_tokenizer(meta, tokenizer_sha256)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: rerun {_rerun(name, producer)}")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged ({err}): rerun {_rerun(name, producer)}") from None
    return meta


def _load_weights(name: str, module: torch.nn.Module, producer: str | None) -> None:
    weights = checkpoint_dir(name) / "model.safetensors"
    try:
        load_model(module, str(weights))
    except (SafetensorError, RuntimeError) as err:  # damaged, or not the shapes meta.json describes
        raise ValueError(f"{weights} does not load ({err}): rerun {_rerun(name, producer)}") from None


def load_gpt(name: str, tokenizer_sha256: str | None = None, producer: str | None = None) -> tuple[GPT, dict]:
    """Load a language-model checkpoint (pretrain, sft, sft_control, aligned) in eval mode."""
    meta = check_checkpoint(name, "gpt", tokenizer_sha256, producer)
    model = GPT(GPTConfig.from_dict(meta["model"]))
    _load_weights(name, model, producer)
    return model.eval(), meta


def load_into(name: str, module: torch.nn.Module, kind: str, tokenizer_sha256: str | None = None,
              producer: str | None = None) -> dict:
    """Load checkpoint `name` of `kind` into an already built `module`; return its meta."""
    meta = check_checkpoint(name, kind, tokenizer_sha256, producer)
    _load_weights(name, module, producer)
    return meta


def load_reward_model(config: GPTConfig, tokenizer_sha256: str | None = None, name: str = "reward") -> ScalarHead:
    """A reward checkpoint as a ScalarHead (with the likelihood term if it was trained with one)."""
    model = ScalarHead(GPT(config), likelihood_term=bool(read_meta(name).get("likelihood_term", False)))
    load_into(name, model, "reward", tokenizer_sha256)
    return model
