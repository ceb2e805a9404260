"""Where inference runs: the `trainer` group's accelerator, devices and precision, for evaluate and chat.

Training hands these fields to Lightning's Trainer; evaluate and chat train nothing, so this module gives
them the same choices:

- device: `cpu`; `gpu`/`cuda` -> this process's CUDA device (local rank i -> the i-th of `trainer.devices`
  when that is a list of ids, else cuda:i); `mps`; `auto` -> cuda, else mps, else cpu (Lightning's order).
- precision: `*-true` converts the weights (bf16-true -> bfloat16, 16-true -> float16, 64-true ->
  float64); `*-mixed` keeps fp32 weights and runs the forward passes under `torch.autocast` (bf16 or
  fp16; fp16 autocast on a CPU becomes bf16, as Lightning does); `32`/`32-true` changes nothing.
- processes: with trainer.devices > 1 or trainer.num_nodes > 1, `launch` starts one process per device
  through Lightning Fabric (DDP: on one machine its launcher re-executes the command line for every
  other local rank, as Trainer does for pretrain; under torchrun or SLURM it reads their ranks) and
  returns this process's rank; the caller splits the work and `Ranks.gather`s it.

Device and precision are plain torch, not Fabric's precision plugins: they come to a dtype table, and
Fabric builds its plugins only through its connector, which probes the hardware itself, so neither chat
nor a one-device evaluate could skip importing Lightning (~14 s here), and no test could stand in for a
CUDA device. Fabric is used where it earns its cost: starting processes and joining their group.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pipeline.config.training import TrainerConfig

M = TypeVar("M", bound=torch.nn.Module)

WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_count() -> int:
    return torch.cuda.device_count()


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def cuda_device(index: int) -> torch.device:
    return torch.device("cuda", index)


def accelerator_type(t: TrainerConfig) -> str:
    """`cpu`, `cuda` or `mps`: what `trainer.accelerator` names on this machine; refused before any work when
    the machine lacks it."""
    a = t.accelerator
    if a == "auto":
        return "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
    if a in ("gpu", "cuda"):
        if not cuda_available():
            raise ValueError(f"trainer.accelerator={a} but this machine has no CUDA device (torch "
                             f"{torch.__version__}): set trainer.accelerator=cpu (or auto), or use trainer=cpu")
        return "cuda"
    if a == "mps":
        if not mps_available():
            raise ValueError("trainer.accelerator=mps but MPS is not available here: set trainer.accelerator=cpu "
                             "(or auto)")
        return "mps"
    if a == "tpu":
        raise ValueError("trainer.accelerator=tpu: evaluate and chat run on cpu, cuda or mps; set "
                         "trainer.accelerator to one of them for this stage")
    return "cpu"


def devices_per_node(t: TrainerConfig) -> int:
    """Processes on each machine: `trainer.devices` (`auto`: every GPU, or one process on a CPU or MPS)."""
    kind = accelerator_type(t)
    if isinstance(t.devices, list):
        n = len(t.devices)
    elif t.devices == "auto":
        n = cuda_count() if kind == "cuda" else 1
    else:
        n = t.devices
    if kind == "mps" and n > 1:
        raise ValueError(f"trainer.devices={t.devices} with trainer.accelerator=mps: a Mac has one MPS device; "
                         f"set trainer.devices=1")
    if kind == "cuda" and t.devices != "auto":
        wanted = max(t.devices) + 1 if isinstance(t.devices, list) else n
        if wanted > cuda_count():
            raise ValueError(f"trainer.devices={t.devices} but this machine has {cuda_count()} CUDA "
                             f"device(s): lower trainer.devices or set trainer.devices=auto")
    return n


def world_size(t: TrainerConfig) -> int:
    return devices_per_node(t) * t.num_nodes


def check_placement(t: TrainerConfig) -> None:
    """Refuse, before any work, an accelerator or device count this machine does not have."""
    world_size(t)


@dataclass(frozen=True)
class Placement:
    """One process's device and precision for inference."""

    device: torch.device
    precision: str = "32-true"

    @classmethod
    def from_config(cls, t: TrainerConfig, local_rank: int = 0) -> Placement:
        kind = accelerator_type(t)
        if kind == "cuda":
            ids = t.devices if isinstance(t.devices, list) else None
            return cls(cuda_device(ids[local_rank] if ids else local_rank), t.precision)
        return cls(torch.device(kind), t.precision)

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype `*-true` precisions convert the weights to (None: keep them as loaded)."""
        return WEIGHTS.get(self.precision)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        dtype = AUTOCAST.get(self.precision)
        if dtype is torch.float16 and self.device.type == "cpu":
            return torch.bfloat16  # fp16 autocast is a GPU feature; Lightning makes it bf16 on a CPU too
        return dtype

    def place(self, model: M) -> M:
        """`model` on this device in this precision (in place, as `Module.to`), in eval mode."""
        return model.to(device=self.device, dtype=self.weights_dtype).eval()

    def autocast(self) -> Any:
        """The context every forward pass runs in: autocast for `*-mixed`, nothing otherwise."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process among those `launch` started: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    def mine(self, n: int) -> range:
        """Of n work items, those this rank does: round-robin, item i on rank i % world."""
        return range(self.rank, n, self.world)

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (a collective: every rank must call it)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


@contextmanager
def launch(t: TrainerConfig) -> Iterator[tuple[Placement, Ranks]]:
    """This process's placement and rank; with trainer.devices x trainer.num_nodes > 1, one process per device
    (DDP through Lightning Fabric, gloo on CPUs, nccl on GPUs), the group torn down on exit."""
    world = world_size(t)
    if world == 1:
        yield Placement.from_config(t), Ranks()
        return
    from lightning.fabric import Fabric

    from pipeline.logs import adopt_lightning
    adopt_lightning()
    kind = accelerator_type(t)
    fabric = Fabric(accelerator=kind, devices=t.devices, num_nodes=t.num_nodes, strategy="ddp")
    fabric.launch()
    try:
        yield Placement.from_config(t, fabric.local_rank), Ranks(fabric.global_rank, fabric.world_size)
        fabric.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
