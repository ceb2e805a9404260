"""The one place a Lightning `Trainer` is built, and `fit`, which every training stage calls.

Strategy, precision, devices, nodes, loggers and callbacks all come from config (`trainer`,
`strategy`, `logger` groups), so moving from the 2-core demo to GPUs is a Hydra choice, not a code
edit. Each stage passes its own step budget and validation cadence.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pipeline import paths
from pipeline.model.gpt import GPT, Block
from pipeline.model.handoff import checkpoint_meta, save_checkpoint
from pipeline.model.lora import is_adapted, merged_gpt
from pipeline.training.curves import CurveRecorder
from pipeline.training.loggers import build_callbacks, build_loggers, log_config, tidy_resumed
from pipeline.training.resume import RequeueSignal, ResumeCheckpoint, ResumeState

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.data.tokenizer import ChatTokenizer
    from pipeline.registry import StageSpec

log = logging.getLogger(__name__)


def build_strategy(cfg: Config):
    """Map `conf/strategy/<name>.yaml` (checked by pipeline.config.training) onto a Lightning strategy."""
    s = cfg.strategy
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        return DDPStrategy(find_unused_parameters=s.find_unused_parameters,
                           process_group_backend=s.process_group_backend)
    if s.name == "fsdp":  # FSDP1 wrapper: one unit per transformer block (CUDA only in Lightning)
        from lightning.pytorch.strategies import FSDPStrategy
        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=s.sharding_strategy, cpu_offload=s.cpu_offload,
                            state_dict_type="full")
    if s.name == "fsdp2":  # per-parameter sharding (fully_shard) applied in Objective.configure_model
        from lightning.pytorch.strategies import ModelParallelStrategy
        # "auto" data parallel size = every process (set in build_trainer once the device count is parsed)
        return ModelParallelStrategy(data_parallel_size=s.data_parallel_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False, process_group_backend=s.process_group_backend)
    if s.name == "deepspeed":
        try:
            import deepspeed  # noqa: F401  (optional extra)
        except ImportError as err:
            raise ValueError(f"strategy={s.name} needs the optional extra: pip install -e '.[deepspeed]'") from err
        from lightning.pytorch.strategies import DeepSpeedStrategy
        return DeepSpeedStrategy(stage=s.stage, offload_optimizer=s.offload_optimizer,
                                 offload_parameters=s.offload_parameters)
    return "auto"


def build_trainer(cfg: Config, stage: str, *, max_steps: int = -1, max_epochs: int | None = None,
                  val_every: int | None = None, val_batches: int | float = 1.0,
                  grad_clip: float | None = None, accumulate: int = 1, log_every: int | None = None,
                  callbacks: list[Callback] | None = None, global_batch_tokens: int | None = None,
                  micro_batch_tokens: int | None = None, run_id: str | None = None,
                  resuming: bool = False) -> L.Trainer:
    """A Trainer for `stage` on the configured accelerator, devices, nodes and strategy (every training stage,
    the RLHF ones included). With `global_batch_tokens`, gradient accumulation is derived from it:
    global tokens = micro_batch_tokens x world size x accumulate, and must divide exactly. The loggers and the
    configured callbacks come from the `logger` and `callbacks` groups (pipeline.training.loggers), after the
    stage's own `callbacks`."""
    t = cfg.trainer
    log_every = log_every or t.log_every_n_steps
    callbacks = [*(callbacks or []), *build_callbacks(cfg)]
    show_bar = t.progress_bar
    if show_bar:  # redrawn on logging steps only: the default redraws (and reads the loss) every step
        from lightning.pytorch.callbacks import RichProgressBar
        callbacks.append(RichProgressBar(refresh_rate=log_every))
    trainer = L.Trainer(plugins=cluster_plugins() or None,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=build_strategy(cfg), max_steps=max_steps, max_epochs=max_epochs,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=val_batches, num_sanity_val_steps=0,
        gradient_clip_val=grad_clip, accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every, logger=build_loggers(cfg, stage, run_id, resuming) or False,
        callbacks=callbacks, enable_checkpointing=False, deterministic=t.deterministic,
        default_root_dir=str(paths.lightning_dir(stage)), enable_model_summary=False, enable_progress_bar=show_bar,
        use_distributed_sampler=False,  # every datamodule splits its global batches over ranks itself
    )
    strategy = trainer.strategy
    if type(strategy).__name__ == "ModelParallelStrategy" and strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = trainer.num_nodes * trainer.num_devices  # Lightning's auto would be num_nodes
    if global_batch_tokens:
        trainer.accumulate_grad_batches = accumulation_steps(global_batch_tokens, micro_batch_tokens,
                                                             trainer.world_size)
    return trainer


def under_slurm() -> bool:
    """Lightning's own test: a SLURM job with tasks (srun), not an interactive one (job name bash/interactive)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    return SLURMEnvironment.detect()


def cluster_plugins() -> list:
    """Under SLURM, its environment with Lightning's requeue off: its handler would save an hpc checkpoint of its
    own inside the signal handler and restore from it behind resume's back; RequeueSignal does it instead."""
    if not under_slurm():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment
    return [SLURMEnvironment(auto_requeue=False)]


def accumulation_steps(global_batch_tokens: int, micro_batch_tokens: int | None, world_size: int) -> int:
    """Micro-batches each rank accumulates so that one optimizer step sees `global_batch_tokens` tokens."""
    per_step = int(micro_batch_tokens or 0) * world_size
    if per_step <= 0 or global_batch_tokens % per_step:
        raise ValueError(f"global_batch_tokens {global_batch_tokens} is not a multiple of batch_size x block_size x "
                         f"world size = {per_step}: change pretrain.global_batch_tokens or pretrain.batch_size")
    return global_batch_tokens // per_step


def prepare_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Activation checkpointing and `torch.compile` as configured (`strategy.activation_checkpointing`,
    `trainer.compile`). `nn.Module.compile` compiles in place, so state_dict keys stay unchanged."""
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        gpt.activation_checkpointing = cfg.strategy.activation_checkpointing
    if cfg.trainer.compile and cfg.strategy.name != "fsdp2":  # fsdp2 compiles each block after sharding it
        model.compile(mode=cfg.trainer.compile_mode)
    return model


def gathered_weights(trainer: L.Trainer, module: L.LightningModule, attr: str) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict of `module.<attr>` on global rank 0 (None on other ranks).

    Under FSDP/FSDP2/ZeRO-3 the parameters are sharded across ranks, so this is a collective call:
    every rank must make it.
    """
    if getattr(trainer.strategy, "zero_stage_3", False):  # DeepSpeed ZeRO-3: gather the partitions first
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    prefix = f"{attr}."
    return {k[len(prefix):]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}


def save_trained_gpt(trainer: L.Trainer, module: L.LightningModule, name: str, cfg: Config, tok: ChatTokenizer,
                     **meta) -> None:
    """Save `module.model` (a GPT, or one with LoRA adapters: saved merged, a plain GPT) as checkpoint `name`:
    gathered from every rank, written by rank 0 only."""
    weights = gathered_weights(trainer, module, "model")
    if trainer.is_global_zero:
        if is_adapted(module.model):
            model = merged_gpt(module.model, weights)
        else:
            model = GPT(module.model.config)
            model.load_state_dict(weights)
        save_checkpoint(name, model, checkpoint_meta(cfg, tok, model, "gpt", **meta))


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, cfg: Config, spec: StageSpec,
        validate: bool = True, callbacks: list[Callback] | None = None,
        **trainer_kwargs) -> tuple[L.Trainer, CurveRecorder, dict[str, float]]:
    """Train `module` on `datamodule` and validate once more at the end; the loggers write the curves as it goes.

    Checkpoints every `resume.every_n_steps`, at the last step and on SLURM's requeue signal into
    `outputs/resume/<stage>/` (pipeline.training.resume); resumes a killed run of the same config from there,
    or continues from `resume.ckpt_path`. A run continued from a finished one's final state carries on its
    curves and token count. The runner marks the state done once the stage has written its outputs, and
    finishes the stage's W&B run (pipeline.harness.tracking). Returns the trainer, the recorded curves and the
    final validation metrics ({} if `validate` is off). `callbacks` are the stage's own (align's monitor): they run
    after the curves and before the resume checkpoint, so that the state they keep is in it. Raises
    resume.Requeued after a requeue.
    """
    stage = spec.name
    resume = ResumeState(cfg, spec)
    curves = CurveRecorder(stage)
    requeue = RequeueSignal(resume) if under_slurm() else None
    trainer = build_trainer(cfg, stage, callbacks=[curves, *(callbacks or []), ResumeCheckpoint(resume, requeue)],
                            run_id=resume.wandb_id, resuming=resume.resuming, **trainer_kwargs)
    if trainer.is_global_zero:
        resume.write_state()
        log.info(resume.describe())
        log_config(trainer.loggers, cfg)
    if cfg.strategy.name == "fsdp2":
        module.fsdp2 = {"compile": cfg.trainer.compile, "compile_mode": cfg.trainer.compile_mode,
                        "reshard_after_forward": cfg.strategy.reshard_after_forward}
    module.peak_tflops = cfg.trainer.peak_tflops
    final: dict[str, float] = {}
    status = "failed"
    try:
        with requeue or nullcontext():  # the signal handler lives while Lightning trains
            # weights_only: the checkpoint holds tensors, numbers and strings only (no pickled objects)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path, weights_only=True)
        if resume.resuming and not curves.totals:  # resumed at its last step: Lightning ran no loop, no on_train_end
            curves.on_train_end(trainer, module)
        if validate:
            final = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
        status = "success"
    finally:
        for lg in trainer.loggers:  # the W&B run stays open: the runner logs the stage's artifacts, then finishes it
            lg.finalize(status)
        if resume.resuming and trainer.is_global_zero:
            tidy_resumed(paths.live_dir(stage))
    return trainer, curves, final
