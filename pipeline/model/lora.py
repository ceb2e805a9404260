"""LoRA through the `peft` library: adapters on a GPT, the base model as the same network with them off, and the
merge that makes a checkpoint plain again (the `peft` group, pipeline.config.peft).

- `add_adapters` is peft's `get_peft_model`: the `PeftModel` it returns freezes every weight of the GPT and puts
  a LoRA pair on each targeted Linear, inside the GPT's own blocks. It passes what it lacks (`config`, `hidden`,
  `new_kv_cache`, ...) on to the GPT, so the objectives, the sampler and the log-prob helpers take it as they
  take a GPT, and the optimizer (pipeline.training.objective.param_groups) sees the adapters only.
- `AdaptersOff` is alignment's frozen reference when the policy trains adapters: the policy itself under
  peft's `disable_adapter()`, in eval mode, which is exactly the model it started from; no second copy in
  memory, none loaded from disk. It holds no parameter, so it reaches no optimizer, state dict or checkpoint.
- `merge` is peft's `merge_and_unload()`: W <- W + (alpha / r) B A and the LoRA layers replaced by plain
  Linears, so a checkpoint is what `load_gpt` reads; `merged_gpt` does the same from a gathered state dict
  (the weights of a sharded run, pipeline.training.trainer.save_trained_gpt).
- `check_adapters` refuses before any work what would fail later or silently do nothing: a target that
  matches no Linear layer (naming `peft.target_modules` and the layers there are), a tied `lm_head`, an
  unknown stage in `peft.stages`, and a missing `peft` install.

peft is imported inside the functions that use it: it is an optional extra (`.[lora]`) and slow to import.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from pipeline.config.model import GPTConfig
from pipeline.config.peft import ALL_LINEAR, LoraConfig, PeftConfig
from pipeline.config.schema import ConfigError
from pipeline.model.gpt import GPT

if TYPE_CHECKING:
    from pipeline.registry import Stage

INSTALL = "pip install -e '.[lora]'"


def applies(peft: PeftConfig, stage: str) -> bool:
    """Whether `stage` trains LoRA adapters under `peft` (sft_control asks for sft: it trains as SFT did)."""
    return isinstance(peft, LoraConfig) and stage in peft.stages


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` is a peft model (a GPT with adapters)."""
    peft = sys.modules.get("peft")  # nothing can be a PeftModel before peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def targets(cfg: LoraConfig, config: GPTConfig) -> list[str]:
    """`peft.target_modules` as names peft matches: `all-linear` becomes the suffixes of every Linear of the
    blocks (peft resolves `all-linear` itself for transformers models only)."""
    if cfg.target_modules != (ALL_LINEAR,):
        return list(cfg.target_modules)
    return list(dict.fromkeys(re.sub(r"^h\.\d+\.", "", n) for n in linear_names(config) if n.startswith("h.")))


def peft_config(cfg: LoraConfig, config: GPTConfig):
    """The `peft` group as peft's own LoraConfig, for a model of shape `config`."""
    from peft import LoraConfig as PeftLoraConfig
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets(cfg, config), bias="none")


def add_adapters(model: GPT, cfg: LoraConfig) -> nn.Module:
    """`model` frozen, with a LoRA pair on each Linear `cfg.target_modules` names (B = 0: the output is
    unchanged until it trains). Draws the A matrices' initial values from torch's global generator."""
    from peft import get_peft_model
    return get_peft_model(model, peft_config(cfg, model.config))


def merge(model: nn.Module) -> nn.Module:
    """`model` with its adapters merged into the base weights, as the plain module it wraps (`model` is spent);
    a module without adapters as it is."""
    return model.merge_and_unload() if is_adapted(model) else model


def merged_gpt(model: nn.Module, state: dict[str, torch.Tensor]) -> GPT:
    """A plain GPT from `state`, a full state dict of `model` (a GPT with adapters), the adapters merged in."""
    from peft import get_peft_model
    fresh = get_peft_model(GPT(model.config), copy.deepcopy(model.peft_config["default"]))
    fresh.load_state_dict(state)
    return fresh.merge_and_unload()


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters the optimizer trains, and all of them (base weights, adapters, heads, frozen copies)."""
    params = list(model.parameters())
    return {"params_trainable": sum(p.numel() for p in params if p.requires_grad),
            "params_total": sum(p.numel() for p in params)}


def adapter_meta(peft: PeftConfig, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint trained with adapters records besides the weights: the counts and the settings."""
    return {**param_counts(model), "peft": peft.to_dict()}


class AdaptersOff(nn.Module):
    """`policy` with its adapters disabled and in eval mode: the base model it started from, for the reference
    log-probabilities of alignment. Called like the model; training mode is restored after each call."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: its weights are the policy's, saved there

    def forward(self, *args, **kwargs) -> torch.Tensor:
        modes = [(m, m.training) for m in self.policy.modules()]
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            for m, mode in modes:
                m.training = mode


# ------------------------------------------------------------------ checks before work

def linear_names(config: GPTConfig) -> list[str]:
    """The names of a GPT's Linear layers (h.0.attn.c_attn, ..., lm_head), from a weightless copy of it."""
    with torch.device("meta"):
        model = GPT(config)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def matches(target: str, name: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or its last dotted parts."""
    return name == target or name.endswith(f".{target}")


def check_targets(cfg: LoraConfig, config: GPTConfig) -> None:
    """Every entry of `peft.target_modules` must match a Linear layer of the model (and not a tied lm_head)."""
    names = linear_names(config)
    missing = [t for t in cfg.target_modules if t != ALL_LINEAR and not any(matches(t, n) for n in names)]
    if missing:
        kinds = list(dict.fromkeys(re.sub(r"^h\.\d+\.", "", n) for n in names))
        raise ConfigError(f"peft.target_modules {list(cfg.target_modules)}: {', '.join(missing)} "
                          f"match{'es' if len(missing) == 1 else ''} no Linear layer of the model; its Linear layers "
                          f"are {', '.join(kinds)} (in each block h.0 ... h.{config.n_layer - 1}): set "
                          "peft.target_modules to names or name suffixes among them")
    if config.tie_embeddings and any(matches(t, "lm_head") for t in cfg.target_modules):
        raise ConfigError("peft.target_modules has lm_head, whose weight is the token embedding's "
                          "(model.tie_embeddings): merging its adapter would change the embedding too; drop lm_head")


def check_adapters(peft: PeftConfig, stage: str, model: GPTConfig | dict, chain: Iterable[Stage]) -> None:
    """Before `stage` works: `peft.stages` names stages of `chain` that read `peft`, and when `stage` trains
    adapters, peft is installed and every target matches a Linear layer of `model` (the config of the
    checkpoint it starts from, or that checkpoint's meta.json `model`)."""
    if not isinstance(peft, LoraConfig):
        return
    known = [s.name for s in chain if "peft" in s.spec.params and s.name != "sft_control"]
    unknown = [s for s in peft.stages if s not in known]
    if unknown:
        raise ConfigError(f"peft.stages {list(peft.stages)}: {', '.join(unknown)} is not a stage that can train "
                          f"adapters: choose among {', '.join(known)}")
    if stage not in peft.stages:
        return
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"peft=lora needs the `peft` library, an optional extra: {INSTALL}")
    check_targets(peft, model if isinstance(model, GPTConfig) else GPTConfig.from_dict(model))
