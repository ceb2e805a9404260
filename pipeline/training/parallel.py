"""What the stages that train under a data-parallel strategy share besides Lightning's own loop.

Lightning all-reduces gradients and shards weights; these are the pieces it leaves to the objective:

- `shares`: a fixed list of work items (chunks of prompts to sample, problems to score) split round-robin over
  the ranks, so that each item is done by exactly one rank, whatever the world size;
- `gather_objects`: every rank's results, in rank order, on every rank (torch.distributed.all_gather_object);
- `token_mean` / `global_mean`: a mean over the tokens of a batch split across ranks. A per-rank masked mean
  averaged by DDP weights every rank alike although their token counts differ; `token_mean` divides the local
  sum by the global count (times the world size, which DDP's averaging divides out), so the gradient is the one
  of the whole batch's token mean; `global_mean` is the value itself (no gradient), for whitening and logging;
- `trained_module`: a trained submodule as one plain module on global rank 0, gathered first where the strategy
  shards it (FSDP, FSDP2, ZeRO-3), to save or score after `fit`.

Without a process group (one device) every function is the single-process computation, bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeline.dist import data_parallel

if TYPE_CHECKING:
    import lightning as L


def shares(n_items: int) -> list[int]:
    """The items of range(n_items) this rank does: rank, rank + world, ..."""
    rank, world = data_parallel()
    return list(range(rank, n_items, world))


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    _, world = data_parallel()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_shares(results: dict[int, Any], n_items: int) -> list[Any]:
    """Per-item results ({item: result} of this rank's `shares`) from every rank, in item order."""
    merged: dict[int, Any] = {}
    for part in gather_objects(results):
        merged.update(part)
    missing = [i for i in range(n_items) if i not in merged]
    if missing:
        raise RuntimeError(f"items {missing[:5]} were done by no rank")
    return [merged[i] for i in range(n_items)]


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks (no gradient flows through it); `x` itself without a process group."""
    _, world = data_parallel()
    if world == 1:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x


def world_size() -> int:
    return data_parallel()[1]


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss whose DDP-averaged gradient is that of the mean of `x` over every rank's masked tokens."""
    mask = mask.to(x.dtype)
    count = all_sum(mask.sum()).clamp(min=1)
    world = world_size()
    local = (x * mask).sum() / count
    return local * world if world > 1 else local


def global_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `x` (over its masked entries) across every rank's batch: the same value on every rank."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    return all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)


def gpt_like(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.nn.Module]:
    """A `rebuild` for `trained_module`: a new GPT of `model`'s config, with LoRA adapters like its own if it has
    them, loaded from a gathered state dict."""
    from pipeline.model.gpt import GPT
    from pipeline.model.lora import is_adapted

    def rebuild(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        if is_adapted(model):
            import copy

            from peft import get_peft_model
            fresh = get_peft_model(GPT(model.config), copy.deepcopy(model.peft_config["default"]))
        else:
            fresh = GPT(model.config)
        fresh.load_state_dict(state)
        return fresh
    return rebuild


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the strategy splits the weights over the ranks (FSDP, FSDP2, DeepSpeed ZeRO-3)."""
    name = type(trainer.strategy).__name__
    return name in ("FSDPStrategy", "ModelParallelStrategy") or bool(getattr(trainer.strategy, "zero_stage_3", False))


def trained_module(trainer: L.Trainer, module: L.LightningModule, attr: str,
                   rebuild: Callable[[dict[str, torch.Tensor]], torch.nn.Module]) -> torch.nn.Module | None:
    """`module.<attr>` after fit as a plain module on global rank 0 (None on the other ranks).

    Replicated (one device, DDP): the module itself. Sharded: its full state dict gathered from every rank (a
    collective: every rank calls this) and loaded by `rebuild(state)` into a new plain module on rank 0.
    """
    if not is_sharded(trainer):
        return getattr(module, attr) if trainer.is_global_zero else None
    from pipeline.training.trainer import gathered_weights
    state = gathered_weights(trainer, module, attr)
    return rebuild(state) if trainer.is_global_zero else None
