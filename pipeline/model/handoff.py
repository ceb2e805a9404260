"""Checkpoints handed from stage to stage by name, never by a path typed into code.

Each checkpoint is a directory `artifacts/<name>/` holding `model.safetensors` (weights only:
loading can't execute code) and `meta.json` (which stage wrote it, the model config, the SHA-256 of
the tokenizer it was trained with, the step and the run id). Loading checks the stage kind and the
tokenizer hash and refuses a mismatch with a message saying what to rerun; `check_checkpoint` does the
same from meta.json and the weights file's header alone, so a stage can refuse its inputs before any work.
A damaged meta.json or weights file is refused the same way, naming the file, and so are weights whose header
does not hold exactly the tensors, of the shapes, of the model meta.json describes (built on the meta device:
no memory, no initialisation).

`producer`, where a caller knows it (the chain does: pipeline.registry.Chain.producer), names the stage
to rerun in those messages.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file

from pipeline.config.identity import run_identity
from pipeline.config.model import GPTConfig
from pipeline.input_files import json_type, read_json, require_file
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
    rerun = f"rerun {_rerun(name, producer)}"
    meta = read_json(path, rerun, missing=f"checkpoint {name!r} not found in {d}: run {_rerun(name, producer)} first")
    missing = [key for key in ("kind", "model") if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a checkpoint's meta.json; {rerun}")
    if not isinstance(meta["model"], dict):
        raise ValueError(f"{path}: its field 'model' is {json_type(meta['model'])}, not the object of the model's "
                         f"shape: {rerun}")
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
        raise ValueError(f"{d} holds a {meta['kind']!r} checkpoint ({d / 'meta.json'}: written as "
                         f"{meta.get('name')!r}), expected {kind!r}{what} for checkpoint {name!r}: rerun "
                         f"{_rerun(name, producer)}")
    check_tokenizer(meta, tokenizer_sha256)
    weights = d / "model.safetensors"
    rerun = f"rerun {_rerun(name, producer)}"
    require_file(weights, rerun, missing=f"{weights} not found: {rerun}")
    if weights.stat().st_size == 0:
        raise ValueError(f"{weights} is damaged (it is empty): {rerun}")
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged ({err}): {rerun}") from None
    problem = _shape_problem(shapes, _module_on_meta(kind, meta, d / "meta.json", rerun))
    if problem:
        raise ValueError(f"{weights} {problem}, which {d / 'meta.json'} describes: the two files are not one "
                         f"checkpoint; {rerun}")
    return meta


def _module_on_meta(kind: str, meta: dict, where: object, rerun: str) -> torch.nn.Module:
    """The module a `kind` checkpoint with `meta` loads into, on the meta device (shapes only)."""
    try:
        config = GPTConfig.from_dict(meta["model"])
    except ValueError as err:
        raise ValueError(f"{where}: its field 'model' is not a model's shape ({err}): {rerun}") from None
    with torch.device("meta"):
        gpt = GPT(config)
        return ScalarHead(gpt, bool(meta.get("likelihood_term", False))) if kind == "reward" else gpt


def _shape_problem(shapes: dict[str, tuple[int, ...]], module: torch.nn.Module) -> str | None:
    """What keeps weights with header `shapes` from loading into `module` (as safetensors' load_model would), or
    None. Tied parameters are saved under one of their names."""
    expected = module.state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        tied.setdefault(id(tensor), []).append(key)
    lacking = [names[0] for names in tied.values() if not any(n in shapes for n in names)]
    if lacking:
        return f"lacks the tensor {lacking[0]!r}" + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        return f"holds the tensor {extra[0]!r}, which the model has no place for"
    for key, shape in shapes.items():
        want = tuple(expected[key].shape)
        if shape != want and not (math.prod(shape) == math.prod(want) == 1):  # lm_scale was once 0-d
            return f"holds {key!r} of shape {list(shape)} where the model needs {list(want)}"
    return None


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
