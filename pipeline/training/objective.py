"""What every objective shares: AdamW with decay on matrices only, warmup + cosine schedule, throughput.

Weight decay on 2-D weights (matmuls, embeddings) but not on biases and LayerNorm gains follows
GPT-2/nanoGPT. The schedule is a linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`
at `max_steps`.
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch

from pipeline.config.training import OptimConfig
from pipeline.dist import data_parallel
from pipeline.logs import adopt_lightning
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead
from pipeline.training.hardware import peak_flops
from pipeline.training.parallel import all_sum, gather_objects


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Objective(L.LightningModule):
    """Base: optimizer + schedule from an `optim` config subtree, throughput and MFU, FSDP2 sharding."""

    flops_per_token: float | None = None
    """Training FLOPs per token of the model being trained; subclasses that know it set it (for MFU)."""
    frozen: tuple[str, ...] = ()
    """Attributes naming frozen submodules (a reference model, a reward model) that run in eval mode while the rest
    trains; any submodule may declare its own (ScalarHead: its frozen LM). Lightning warns at the start of training
    about every module in eval mode, to catch one left there by mistake (a loaded checkpoint is in eval mode):
    the declared ones are put in train mode for that check (`on_fit_start`) and in eval mode right after it
    (`on_train_start`), so the warning keeps its use for every other module."""

    def __init__(self, optim: OptimConfig, max_steps: int) -> None:
        super().__init__()
        adopt_lightning()  # before the Trainer logs: Lightning's lines go where pipeline.logs sends them
        self.optim_cfg = optim
        self.max_steps = max_steps
        self.peak_tflops: float | None = None  # trainer.peak_tflops, set by pipeline.training.trainer.fit
        self.fsdp2: dict | None = None          # sharding options when strategy=fsdp2, set by fit
        self._last_time: float | None = None
        self._tokens: int | torch.Tensor = 0
        self._peak: float | None = None
        self.tokens_trained: int | torch.Tensor = 0
        """Tokens of every training batch this rank has seen (a device tensor, read once at the end)."""
        self.nonfinite_loss: torch.Tensor | None = None
        """True once a training loss was NaN/inf; read (one sync) by pipeline.training.resume.check_finite."""
        self.generator: torch.Generator | None = None  # online RL samples from it (make_generator)
        self._restored: dict = {}
        self._sums: dict[str, tuple] = {}  # validation means being accumulated (accumulate)

    def accumulate(self, prefix: str, values: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """Add a validation batch's per-row `values` ({name: (B,)}) with row weights (0 for a rank's padding rows)
        to the means `on_validation_epoch_end` logs as `<prefix>/<name>`."""
        for name, v in values.items():
            total, count = self._sums.get(f"{prefix}/{name}", (0.0, 0.0))
            self._sums[f"{prefix}/{name}"] = (total + (v.detach().float() * weight).sum(), count + weight.sum())

    def on_validation_epoch_end(self) -> None:
        """Log each accumulated mean over every rank's rows: sums and weights are reduced, not per-rank means, so a
        validation split over ranks gives one device's numbers."""
        for key, (total, count) in sorted(self._sums.items()):  # the same keys, in the same order, on every rank
            self.log(key, all_sum(total) / all_sum(count).clamp(min=1e-12))
        self._sums = {}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())  # stays on the device: no sync per step
        self.nonfinite_loss = bad if self.nonfinite_loss is None else self.nonfinite_loss | bad

    def make_generator(self, seed: int) -> torch.Generator:
        """This rank's sampling generator, seeded with seed + rank (every rank samples its own share); on resume,
        at the state the checkpoint recorded for this rank."""
        rank, world = data_parallel()
        g = torch.Generator(device=self.device).manual_seed(seed + rank)
        states = self._restored.pop("generators", None)
        state = states[rank] if states and len(states) == world else self._restored.get("generator")
        self._restored.pop("generator", None)
        if state is not None:
            g.set_state(state)
        return g

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank makes this call (Lightning dumps the checkpoint on all of them, rank 0 writes it): the
        generators of all ranks are gathered into it."""
        state = self.generator.get_state() if self.generator is not None else None
        checkpoint["objective"] = {"tokens_trained": int(self.tokens_trained), "generator": state}
        if data_parallel()[1] > 1 and state is not None:
            checkpoint["objective"]["generators"] = gather_objects(state)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = dict(checkpoint.get("objective") or {})
        self.tokens_trained = self._restored.pop("tokens_trained", 0)

    def configure_optimizers(self):
        o = self.optim_cfg
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups(self, o.weight_decay), lr=o.lr, betas=tuple(o.betas), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, self.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """Under strategy=fsdp2 (Lightning's ModelParallelStrategy): shard every transformer block, then
        each GPT and each scalar head, then this module, over the data-parallel mesh (FSDP2 `fully_shard`)."""
        if not self.fsdp2 or self.device_mesh is None or self.fsdp2.get("applied"):
            return  # Lightning calls this hook again for trainer.validate after fit
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = self.device_mesh["data_parallel"]
        reshard = self.fsdp2["reshard_after_forward"]
        for gpt in [m for m in self.modules() if isinstance(m, GPT)]:
            for block in gpt.h:
                if self.fsdp2["compile"]:
                    block.compile(mode=self.fsdp2["compile_mode"])
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(gpt, mesh=mesh, reshard_after_forward=reshard)
            register_fsdp_forward_method(gpt, "hidden")  # reward heads and critics call it, not forward
        for head in [m for m in self.modules() if isinstance(m, ScalarHead)]:  # its own group: the root's
            fully_shard(head, mesh=mesh, reshard_after_forward=reshard)        # forward is never called
            register_fsdp_forward_method(head, "per_token")
        fully_shard(self, mesh=mesh, reshard_after_forward=reshard)
        self.fsdp2["applied"] = True

    def on_fit_start(self) -> None:
        self._peak = peak_flops(self.device, str(self.trainer.precision), self.peak_tflops)
        for frozen in self.frozen_modules():  # nothing runs between here and on_train_start (no sanity check)
            frozen.train()

    def on_train_start(self) -> None:
        """The frozen submodules to eval mode, for all of training (no dropout in them): Lightning's validation
        loop restores each module's own mode after it."""
        for frozen in self.frozen_modules():
            frozen.eval()

    def on_fit_end(self) -> None:
        for frozen in self.frozen_modules():  # a run resumed at its last step ran no loop, no on_train_start
            frozen.eval()

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The submodules named by `frozen` on this module or any of its submodules."""
        return [getattr(m, attr) for m in self.modules() for attr in getattr(m, "frozen", ()) if hasattr(m, attr)]

    def count_tokens(self, n_tokens: int | torch.Tensor) -> None:
        """Add a training batch's tokens to `tokens_trained` (which `pipeline.training.trainer.fit` reports)."""
        self.tokens_trained = self.tokens_trained + n_tokens

    def log_throughput(self, n_tokens: int | torch.Tensor, batch_idx: int) -> None:
        """Count this step's tokens; on logging steps (every trainer.log_every_n_steps) log the learning
        rate, train/tokens_per_sec (all ranks together) and train/mfu averaged since the last log.

        `n_tokens` may be a device tensor: it is summed on the device and read once per log, so
        training does not wait for the GPU every step. MFU = model FLOPs per token x tokens/s per
        device ÷ the device's peak FLOP/s (pipeline.training.hardware), logged where the peak is known.
        """
        self._tokens = self._tokens + n_tokens
        self.count_tokens(n_tokens)
        if batch_idx != 0 and (batch_idx + 1) % max(1, self.trainer.log_every_n_steps):
            return
        now = time.perf_counter()
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self._last_time is not None:
            per_device = float(self._tokens) / max(now - self._last_time, 1e-9)
            self.log("train/tokens_per_sec", per_device * self.trainer.world_size)
            if self._peak and self.flops_per_token:
                self.log("train/mfu", self.flops_per_token * per_device / self._peak)
        self._last_time, self._tokens = now, 0
