"""The config groups of training: the optimizer (`optim` of every training stage), the pretrain, sft and reward
stages, the Lightning Trainer (`trainer`), the distributed strategy (`strategy`), and resuming (`resume`);
the loggers and callbacks are pipeline.config.loggers."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.schema import Schema

Count = Annotated[int, Field(ge=1)]
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
Precision = Literal["32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"]
Betas = Annotated[tuple[float, float], Field(strict=False)]  # YAML writes a list


class OptimConfig(Schema):
    """AdamW with decay on matrices only and a linear warmup to `lr`, then cosine decay to lr * min_lr_ratio."""

    lr: Annotated[float, Field(gt=0)] = 3e-4
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """The learning rate at the last step, as a share of `lr` (1 = constant after warmup)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: Betas = (0.9, 0.95)


class StepsConfig(Schema):
    """What every stage that trains for a number of optimizer steps sets."""

    max_steps: Count
    batch_size: Count
    """Rows per optimizer step on each device (sequences, conversations, pairs)."""
    grad_clip: Annotated[float, Field(ge=0)] | None = 1.0
    """Clip the gradient norm to this (null = no clipping)."""
    val_every: Count = 100
    """Validate every N optimizer steps."""
    val_batches: Count
    """Validation batches per validation."""
    optim: OptimConfig


class PretrainConfig(StepsConfig):
    """The `pretrain` group: next-token prediction on the pretraining text."""

    where = "pretrain"

    max_steps: Annotated[int, Field(ge=0)]
    """Optimizer steps; 0 (with model.init_from) hands the imported weights to sft unchanged."""
    accumulate: Count = 1
    """Gradient accumulation steps (ignored when global_batch_tokens is set)."""
    global_batch_tokens: Count | None = None
    """Tokens per optimizer step over all devices, e.g. 524288; sets the accumulation."""


class SFTConfig(StepsConfig):
    """The `sft` group: finetuning on chat conversations, loss on the assistant's replies."""

    where = "sft"

    packing: bool = True
    """Pack each batch's conversations into rows of model.block_size (no attention across conversations, positions
    restarting per conversation: pipeline.data.packing) instead of padding them; batches are then drawn shuffled
    rather than by length band, which packs tighter. The same loss, fewer positions (benchmarks/packing.py)."""


class OnPolicyConfig(Schema):
    """Preference pairs from the SFT policy's own wrong samples, labelled by the generator's checker."""

    prompts: Annotated[int, Field(ge=0)] = 2000
    """RL prompts to sample (0 = synthetic corruptions only)."""
    samples: Count = 4
    """Samples per prompt."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    max_new_tokens: Count = 16
    batch_size: Count = 256
    """Draws sampled together; each batch has its own seed and goes to one device, so the pairs are the same
    on any number of devices."""


class RewardConfig(StepsConfig):
    """The `reward` group: a Bradley-Terry reward model on preference pairs."""

    where = "reward"

    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Preference pairs held out to measure pairwise accuracy."""
    likelihood_term: bool = True
    """Add s * log p(response) under the frozen SFT backbone to the head's score (pipeline.model.heads)."""
    packing: bool = True
    """Pack each batch's chosen and rejected sequences into rows of model.block_size (pipeline.data.packing)
    instead of padding them: the same scores, fewer positions (benchmarks/packing.py)."""
    on_policy: OnPolicyConfig = OnPolicyConfig()


class TrainerConfig(Schema):
    """The `trainer` group (conf/trainer/*.yaml): where and how Lightning trains."""

    where = "trainer"

    accelerator: Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"] = "cpu"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] | list[int] = 1
    """Processes on this machine (`auto`: every GPU), or the device ids to use."""
    num_nodes: Count = 1
    precision: Precision = "32-true"
    log_every_n_steps: Count = 10
    num_threads: Count | None = None
    """torch intra-op threads; null = torch's default."""
    matmul_precision: Literal["highest", "high", "medium"] | None = None
    """torch.set_float32_matmul_precision; `high` lets fp32 matmuls use TF32 tensor cores on GPUs."""
    compile: bool = False
    """torch.compile the GPT (per block under strategy=fsdp2)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    peak_tflops: Annotated[float, Field(gt=0)] | None = None
    """The device's peak TFLOP/s for MFU; null = looked up from the device name (pipeline.training.hardware)."""
    deterministic: bool = False
    progress_bar: bool = True
    """A rich bar, redrawn every log_every_n_steps."""


class AutoStrategy(Schema):
    """Lightning picks: single device, or DDP when devices > 1."""

    name: Literal["auto"] = "auto"
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward: less memory, ~30% more compute."""


class DDPConfig(Schema):
    """Data parallel: a full replica per process, gradients all-reduced."""

    name: Literal["ddp"]
    find_unused_parameters: bool = False
    process_group_backend: Literal["nccl", "gloo"] | None = None
    """null: nccl on GPUs, gloo on CPU."""
    activation_checkpointing: bool = False


class FSDPConfig(Schema):
    """FSDP (Lightning's FSDPStrategy): one FSDP unit per transformer block. CUDA only in Lightning."""

    name: Literal["fsdp"]
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    cpu_offload: bool = False
    activation_checkpointing: bool = False


class FSDP2Config(Schema):
    """FSDP2 (per-parameter sharding with torch's fully_shard) through Lightning's ModelParallelStrategy."""

    name: Literal["fsdp2"]
    data_parallel_size: Count | Literal["auto"] = "auto"
    """Ranks the model is sharded over; `auto`: every process."""
    reshard_after_forward: bool = True
    """Free gathered weights after forward (ZeRO-3-like); false = ZeRO-2-like."""
    activation_checkpointing: bool = False
    process_group_backend: Literal["nccl", "gloo"] | None = None


class DeepSpeedConfig(Schema):
    """DeepSpeed ZeRO (optional extra: pip install -e '.[deepspeed]')."""

    name: Literal["deepspeed"]
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    activation_checkpointing: bool = False


StrategyConfig = Annotated[AutoStrategy | DDPConfig | FSDPConfig | FSDP2Config | DeepSpeedConfig,
                           Field(discriminator="name")]
STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "deepspeed")


class ResumeConfig(Schema):
    """Mid-run checkpoints of every training stage in outputs/resume/<stage>/ (pipeline.training.resume)."""

    where = "resume"

    every_n_steps: Annotated[int, Field(ge=0)] = 100
    """Optimizer steps between checkpoints (0 = none)."""
    every_n_iterations: Annotated[int, Field(ge=0)] = 10
    """The same for online RL (PPO, GRPO): rollout + update iterations."""
    mode: Literal["auto", "never", "force"] = "auto"
    """auto: a rerun of the same config resumes a killed run | never: start over | force: resume a killed run
    despite a changed config. A finished run (its outputs written) is resumed only through `ckpt_path`."""
    keep: Count = 1
    """Step checkpoints kept (the newest K, the finished run's final state among them)."""
    ckpt_path: str | None = Field(None, examples=["last"])
    """null: as `mode` says | last: continue from the stage's newest checkpoint, a finished run's final state
    included, under any config of the stage (not on changed inputs) | a path: continue from that checkpoint
    (a kept step-N.ckpt, or any Lightning checkpoint of the stage)."""
    requeue_signal: Literal["USR1", "USR2"] = "USR2"
    """Under SLURM, the signal that asks for a checkpoint and a requeue (submitit sends USR2; an sbatch script
    with `--signal=USR1@90` sends USR1)."""

    @model_validator(mode="after")
    def _ckpt_path(self):
        if self.ckpt_path is not None and not self.ckpt_path.strip():
            raise ValueError("@.ckpt_path is empty: set it to null, last, or the path of a checkpoint file "
                             "(e.g. outputs/resume/sft/step-00000004.ckpt)")
        if self.ckpt_path is not None and self.mode == "never":
            raise ValueError(f"@.ckpt_path is {self.ckpt_path} but @.mode is never (start over): drop one of them")
        return self

    def checkpoint_file(self, stage: str, root=None):
        """The checkpoint a path `ckpt_path` names, for training stage `stage`; None for null, `last`, or one that
        records another stage (which `stage` leaves alone, so a multi-stage run applies it to its own stage).
        FileNotFoundError / ValueError unless it exists and loads as plain tensors and data (weights_only)."""
        from pathlib import Path

        from pipeline import paths
        if self.ckpt_path in (None, "last"):
            return None
        path, root = Path(self.ckpt_path), Path(root or paths.RESUME_ROOT)
        kept = sorted(map(str, (root / stage).glob("step-*.ckpt")))
        fix = (f"name one of {', '.join(kept)}, or " if kept else "") + \
            "set resume.ckpt_path=last (the newest checkpoint) or null (start over, or resume as resume.mode says)"
        if not path.exists():
            raise FileNotFoundError(f"resume.ckpt_path: {path} does not exist: {fix}")
        owner = path.parent.name if path.parent.parent == root else None
        if path.is_file():  # a directory: DeepSpeed's sharded format, which DeepSpeed checks itself
            import torch
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # an UnpicklingError for foreign objects, anything for a damaged file
                raise ValueError(f"resume.ckpt_path: {path} does not load as plain tensors and data ({err}): "
                                 f"{fix}") from None
            # the stage pipeline.training.resume.ResumeCheckpoint records in every checkpoint it writes
            owner = ckpt.get("callbacks", {}).get("ResumeCheckpoint", {}).get("stage", owner)
        return path if owner in (None, stage) else None
