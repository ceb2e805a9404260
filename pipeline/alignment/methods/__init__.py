"""The alignment methods: every module of this package is one, configured by conf/align/<name>.yaml.

A method module holds everything about the method, so adding one touches that .py and that .yaml only:
- `Config`: its config schema (`align` group), a subclass of `MethodConfig` with `method: Literal[<name>]`;
- `NEEDS`: the checkpoints it reads besides the SFT policy it starts from ({name: kind}), a literal (it is
  read from the source for dvc.yaml, so that writing dvc.yaml imports no method);
- `splits(cfg)`: the prepared splits it reads under a config;
- `policy_updates(cfg)`: the optimizer steps it gives the policy (what sft_control matches);
- `SUMMARY`: the logged keys whose first and last quarter of the run its metrics report;
- its objective (a LightningModule) and `train(cfg, method_cfg, spec, policy, reference, tok)`, which
  fits it under the configured strategy and returns (the curves, its own metrics, the trained policy as one
  plain module on global rank 0 and None on the other ranks: `pipeline.training.parallel.trained_module`).
  `reference` is the frozen SFT model as a module to call: a second copy, or the policy with its LoRA
  adapters off (pipeline.alignment.align); the policy may be a GPT with adapters (pipeline.model.lora), whose
  trainable parameters are the adapters only. Under data parallelism each rank gets its share of every
  global batch; token means over a batch split across ranks use `pipeline.training.parallel.token_mean`.

Methods are found by module name (`load`), not registered in a list: the module name is the method's
name and the YAML's `method`. Method modules import Lightning, so only the stages that align (and the
control that matches them) load one.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.config.align import MIN_PROMPT, MethodConfig
from pipeline.config.schema import ConfigError

if TYPE_CHECKING:
    from pipeline.config.root import Config

MONITOR_REWARD = "reward"  # the reward model's checkpoint, which align's monitor scores with whatever the method


def names() -> list[str]:
    """Every method there is: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module(name: str) -> ModuleType:
    """Method `name`'s module; a ConfigError naming the choices for a method there is not."""
    if name not in names():
        raise ConfigError(f"align.method {name!r} is unknown: choose one of {', '.join(names())} "
                          "(align=<name>, files in conf/align/)")
    return importlib.import_module(f"{__name__}.{name}")


def load(cfg: Config) -> tuple[ModuleType, MethodConfig]:
    """The configured method's module and its checked config (`align`, with its answer budgets checked
    against model.block_size)."""
    method = module(cfg.align.method)
    acfg = method.Config.parse(cfg.align.to_dict())
    block = cfg.model.block_size
    for field, budget in acfg.answer_budgets().items():
        if MIN_PROMPT + budget > block:
            raise ConfigError(f"align.{field} ({budget}) leaves no room for a prompt in model.block_size ({block}): "
                              f"lower align.{field} below {block - MIN_PROMPT} or raise model.block_size")
    return method, acfg


def check_world(acfg: MethodConfig, world: int, strategy: str, zero_stage: int | None = None) -> None:
    """An online method's global batches must split evenly over the processes (each rank samples its share), and
    its weights must not be sharded: ranks decode for as many steps as their own rows need, and a sharded forward
    is a collective every rank must make as often."""
    online = hasattr(acfg, "rollout_batch")
    sharded = world > 1 and (strategy in ("fsdp", "fsdp2") or zero_stage == 3)
    if online and sharded:
        raise ConfigError(f"align.method {acfg.method} samples token by token on each rank, which sharded weights "
                          f"(strategy={strategy}{' stage 3' if zero_stage == 3 else ''}) cannot do: use "
                          "strategy=ddp (or deepspeed stage 1/2) for it")
    if acfg.eval_every and sharded:
        raise ConfigError(f"align.eval_every ({acfg.eval_every}) evaluates the policy on rank 0 alone, which sharded "
                          f"weights (strategy={strategy}{' stage 3' if zero_stage == 3 else ''}) cannot do: set "
                          "align.eval_every=0 (evaluate still scores the result) or use strategy=ddp")
    for field in ("rollout_batch", "minibatch_size"):
        value = getattr(acfg, field, None)
        if value is not None and value % world:
            raise ConfigError(f"align.{field} ({value}) does not split over {world} processes (trainer.devices x "
                              f"trainer.num_nodes): make it a multiple of {world}")


def declared_needs(name: str) -> dict[str, str]:
    """Method `name`'s NEEDS, read from its source: the literal it assigns (no import of the method)."""
    path = next(Path(m.module_finder.path) / f"{name}.py" for m in pkgutil.iter_modules(__path__) if m.name == name)
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(getattr(t, "id", None) == "NEEDS" for t in targets) and node.value is not None:
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                raise ValueError(f"{path}: NEEDS must be a literal dict of checkpoint name -> kind") from None
    raise ValueError(f"{path} declares no NEEDS: add NEEDS = {{}} (the checkpoints it reads besides the policy)")


def needs(cfg: Config | None) -> dict[str, str]:
    """The checkpoints alignment reads besides its starting point: the configured method's, or (None) what any
    method may read (from the modules' sources: dvc.yaml is written without importing Lightning)."""
    if cfg is not None:
        method, acfg = load(cfg)
        return {**method.NEEDS, **({MONITOR_REWARD: "reward"} if acfg.eval_every else {})}  # the monitor's judge
    return {MONITOR_REWARD: "reward", **{name: kind for m in names() for name, kind in declared_needs(m).items()}}
