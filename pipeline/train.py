"""The one place a Lightning `Trainer` is built, and `fit`, which every training stage calls.

Strategy, precision, devices, nodes, loggers and callbacks all come from config (`trainer`,
`strategy`, `logger` groups), so moving from the 2-core demo to GPUs is a Hydra choice, not a code
edit. Each stage passes its own step budget and validation cadence.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig


CURVES_DIR = Path("metrics/curves")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


class CurveRecorder(Callback):
    """Keeps every logged scalar, so a stage can write its curves as DVC plots, and the run's totals.

    Rows are written to `metrics/curves/<stage>_train.json` and `<stage>_val.json` (lists of
    {"step": n, metric: value or null}), which dvc.yaml declares as plots. `totals` is {"device": what it
    trained on, "tokens": the tokens of every training batch, all ranks together}, for the stage's
    metrics and the report.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.val_keys: set[str] = set()
        self.totals: dict[str, str | int | None] = {}

    @staticmethod
    def _row(trainer: L.Trainer, keep) -> dict:
        row = {"step": int(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if keep(key) and value.numel() == 1:
                row[key] = round(float(value), 6)
        return row

    def state_dict(self) -> dict:  # a resumed run continues the curves of the killed one
        return {"train": self.train, "val": self.val, "val_keys": sorted(self.val_keys)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train, self.val, self.val_keys = state_dict["train"], state_dict["val"], set(state_dict["val_keys"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 or (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            row = self._row(trainer, lambda k: k not in self.val_keys)
            if len(row) > 1 and (not self.train or self.train[-1]["step"] != row["step"]):
                self.train.append(row)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            row = self._row(trainer, lambda k: k.startswith("val/"))
            self.val_keys.update(row)
            if len(row) > 1 and (not self.val or self.val[-1]["step"] != row["step"]):
                self.val.append(row)

    def on_train_end(self, trainer, pl_module) -> None:
        from pipeline.hardware import describe_device
        counted = getattr(pl_module, "tokens_trained", None)  # set by pipeline.objectives.base.Objective
        tokens = None
        if counted is not None:
            tokens = torch.as_tensor(counted, device=pl_module.device)
            if trainer.world_size > 1:  # a collective: every rank reaches on_train_end
                tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
            tokens = int(tokens)
        self.totals = {"device": describe_device(pl_module.device, trainer.world_size), "tokens": tokens}

    def write(self) -> None:
        CURVES_DIR.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", self.train), ("val", self.val)):
            path = CURVES_DIR / f"{self.stage}_{split}.json"
            if rows:  # every row with every key (null where not logged): DVC plots only rows whose keys match
                keys = list(dict.fromkeys(k for row in rows for k in row))
                path.write_text(json.dumps([{k: row.get(k) for k in keys} for row in rows]) + "\n")
            else:  # a run that logged no such curve leaves none behind from an earlier run
                path.unlink(missing_ok=True)


STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "deepspeed")


def build_strategy(cfg: DictConfig):
    """Map `conf/strategy/<name>.yaml` onto a Lightning strategy object."""
    s = cfg.strategy
    name = s.name
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        return DDPStrategy(find_unused_parameters=bool(s.get("find_unused_parameters", False)),
                           process_group_backend=s.get("process_group_backend"))
    if name == "fsdp":  # FSDP1 wrapper: one unit per transformer block (CUDA only in Lightning)
        from lightning.pytorch.strategies import FSDPStrategy

        from pipeline.model.gpt import Block
        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=s.get("sharding_strategy", "FULL_SHARD"),
                            cpu_offload=bool(s.get("cpu_offload", False)), state_dict_type="full")
    if name == "fsdp2":  # per-parameter sharding (fully_shard) applied in Objective.configure_model
        from lightning.pytorch.strategies import ModelParallelStrategy
        # "auto" data parallel size = every process (set in build_trainer once the device count is parsed)
        return ModelParallelStrategy(data_parallel_size=s.get("data_parallel_size", "auto"), tensor_parallel_size=1,
                                     save_distributed_checkpoint=False,
                                     process_group_backend=s.get("process_group_backend"))
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401  (optional extra)
        except ImportError as err:
            raise ValueError(f"strategy={name} needs the optional extra: pip install -e '.[deepspeed]'") from err
        from lightning.pytorch.strategies import DeepSpeedStrategy
        return DeepSpeedStrategy(stage=int(s.stage), offload_optimizer=bool(s.get("offload_optimizer", False)),
                                 offload_parameters=bool(s.get("offload_parameters", False)))
    raise ValueError(f"strategy.name {name!r} is unknown: choose one of {', '.join(STRATEGIES)} (conf/strategy/)")


def build_logger(cfg: DictConfig, stage: str, run_id: str | None = None):
    """A WandbLogger for this stage (job_type = stage, group = the pipeline run), or False.

    `run_id` (pipeline.resume) is the W&B run id: a resumed stage continues its run (resume="allow")."""
    from pipeline.tracking import logger_name, wandb_init_kwargs
    if logger_name(cfg) == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    kwargs = wandb_init_kwargs(cfg, stage)
    return WandbLogger(save_dir=kwargs.pop("dir"), log_model=False, id=run_id, resume="allow" if run_id else None,
                       **kwargs)


def build_trainer(cfg: DictConfig, stage: str, *, max_steps: int = -1, max_epochs: int | None = None,
                  val_every: int | None = None, val_batches: int | float = 1.0,
                  grad_clip: float | None = None, accumulate: int = 1, log_every: int | None = None,
                  callbacks: list[Callback] | None = None, global_batch_tokens: int | None = None,
                  micro_batch_tokens: int | None = None, single_device: bool = False,
                  run_id: str | None = None) -> L.Trainer:
    """A Trainer for `stage`. With `global_batch_tokens`, gradient accumulation is derived from it:
    global tokens = micro_batch_tokens x world size x accumulate, and must divide exactly.
    `single_device` ignores `strategy`, `devices` and `num_nodes`: for stages that score, sample or
    save outside Lightning's loop (reward, align), which would otherwise run once per rank."""
    t = cfg.trainer
    if str(t.precision) not in PRECISIONS:
        raise ValueError(f"trainer.precision {t.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
    log_every = log_every or t.log_every_n_steps
    callbacks = list(callbacks or [])
    show_bar = bool(t.get("progress_bar", True))
    if show_bar:  # redrawn on logging steps only: the default redraws (and reads the loss) every step
        from lightning.pytorch.callbacks import RichProgressBar
        callbacks.append(RichProgressBar(refresh_rate=log_every))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=1 if single_device else t.devices,
        num_nodes=1 if single_device else t.num_nodes, precision=t.precision,
        strategy="auto" if single_device else build_strategy(cfg), max_steps=max_steps, max_epochs=max_epochs,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=val_batches, num_sanity_val_steps=0,
        gradient_clip_val=grad_clip, accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every, logger=build_logger(cfg, stage, run_id),
        callbacks=callbacks, enable_checkpointing=False, deterministic=t.get("deterministic", False),
        default_root_dir=f"outputs/lightning/{stage}", enable_model_summary=False, enable_progress_bar=show_bar,
        use_distributed_sampler=False,  # every datamodule splits its global batches over ranks itself
    )
    strategy = trainer.strategy
    if type(strategy).__name__ == "ModelParallelStrategy" and strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = trainer.num_nodes * trainer.num_devices  # Lightning's auto would be num_nodes
    if global_batch_tokens:
        trainer.accumulate_grad_batches = accumulation_steps(global_batch_tokens, micro_batch_tokens, trainer.world_size)
    return trainer


def accumulation_steps(global_batch_tokens: int, micro_batch_tokens: int | None, world_size: int) -> int:
    """Micro-batches each rank accumulates so that one optimizer step sees `global_batch_tokens` tokens."""
    per_step = int(micro_batch_tokens or 0) * world_size
    if per_step <= 0 or global_batch_tokens % per_step:
        raise ValueError(f"global_batch_tokens {global_batch_tokens} is not a multiple of batch_size x block_size x "
                         f"world size = {per_step}: change pretrain.global_batch_tokens or pretrain.batch_size")
    return global_batch_tokens // per_step


def prepare_model(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """Activation checkpointing and `torch.compile` as configured (`strategy.activation_checkpointing`,
    `trainer.compile`). `nn.Module.compile` compiles in place, so state_dict keys stay unchanged."""
    from pipeline.model import GPT
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        gpt.activation_checkpointing = bool(cfg.strategy.get("activation_checkpointing", False))
    if cfg.trainer.get("compile") and cfg.strategy.name != "fsdp2":  # fsdp2 compiles each block after sharding it
        model.compile(mode=cfg.trainer.get("compile_mode"))
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


def save_trained_gpt(trainer: L.Trainer, module: L.LightningModule, name: str, cfg: DictConfig, tok, **meta) -> None:
    """Save `module.model` (a GPT) as checkpoint `name`: gathered from every rank, written by rank 0 only."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.context import checkpoint_meta
    from pipeline.model import GPT

    weights = gathered_weights(trainer, module, "model")
    if trainer.is_global_zero:
        model = GPT(module.model.config)
        model.load_state_dict(weights)
        save_checkpoint(name, model, checkpoint_meta(cfg, tok, model, "gpt", **meta))


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, cfg: DictConfig, stage: str,
        validate: bool = True, **trainer_kwargs) -> tuple[L.Trainer, CurveRecorder, dict[str, float]]:
    """Train `module` on `datamodule`, validate once more at the end, write curves.

    Checkpoints every `resume.every_n_steps` into `outputs/resume/<stage>/` and, when a killed run of
    the same config left one there, resumes from it (pipeline.resume); the runner removes it once the
    stage has written its outputs, and finishes the stage's W&B run (pipeline.tracking). Returns the
    trainer, the recorded curves and the final validation metrics ({} if `validate` is off).
    """
    from pipeline.resume import ResumeCheckpoint, ResumeState
    resume = ResumeState(cfg, stage)
    curves = CurveRecorder(stage)
    trainer = build_trainer(cfg, stage, callbacks=[curves, ResumeCheckpoint(resume)], run_id=resume.wandb_id,
                            **trainer_kwargs)
    if trainer.is_global_zero:
        resume.write_state()
        print(resume.describe(), file=sys.stderr, flush=True)
    if cfg.strategy.name == "fsdp2" and not trainer_kwargs.get("single_device"):
        module.fsdp2 = {"compile": bool(cfg.trainer.get("compile")), "compile_mode": cfg.trainer.get("compile_mode"),
                        "reshard_after_forward": bool(cfg.strategy.get("reshard_after_forward", True))}
    module.peak_tflops = cfg.trainer.get("peak_tflops")
    final: dict[str, float] = {}
    status = "failed"
    try:
        # weights_only: the checkpoint holds tensors, numbers and strings only (no pickled objects)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path, weights_only=True)
        if validate:
            final = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
        status = "success"
    finally:
        for lg in trainer.loggers:  # the W&B run stays open: the runner logs the stage's artifacts, then finishes it
            lg.finalize(status)
    if trainer.is_global_zero:
        curves.write()
    return trainer, curves, final
