"""Resuming a training stage after it was killed: periodic checkpoints, their identity, RNG state.

Every training stage (its spec says `trains`) trains through `pipeline.training.trainer.fit`, which
keeps `outputs/resume/<stage>/`:

- `step-<N>.ckpt`: a Lightning checkpoint (weights, optimizer, LR schedule, loop progress, the
  datamodule's data position, the callbacks' state incl. every RNG), written every
  `resume.every_n_steps` optimizer steps (online RL: `resume.every_n_iterations` iterations) to a
  temp file renamed into place, and only once the weights and the losses since the last check are
  finite: a crash never leaves a half-written or NaN checkpoint behind.
- `state.json`: the run's fingerprint (the resolved config minus `resume`/`logger`/`run`/`stage`, and
  the bytes of what identifies its inputs: the meta.json of every checkpoint the stage reads under this
  config and the identity file of every other input, per its StageSpec), the W&B run id,
  and the current checkpoint's name, step and SHA-256. It is replaced atomically after the new
  checkpoint is complete (then the previous one is deleted), so a kill at any instant leaves a state
  that names a whole checkpoint.

A rerun (`dvc repro` runs the stage's command again; DVC never touches `outputs/`) with the same
fingerprint resumes from that checkpoint under the same W&B run id (`resume="allow"`), once its
SHA-256 matches and it loads as plain tensors and data; a changed config or upstream starts over.
`resume.mode`: `auto` (that), `never` (always start over), `force` (resume although the fingerprint
changed, e.g. with a lower learning rate after a NaN). The runner removes the directory once the
stage has written its outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import string
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from pipeline import paths
from pipeline.dist import global_rank
from pipeline.io import file_sha256, write_json

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec

VOLATILE_KEYS = ("stage", "resume", "logger", "run")  # change nothing a run computes
# Lightning looks for resumable *dataloaders*; ours resume through the datamodule's state (see datamodules.py)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def input_files(cfg: Config, spec: StageSpec) -> list[Path]:
    """The files whose bytes identify what `spec`'s stage reads under `cfg`: each checkpoint's meta.json and
    each other input's identity file (paths.IDENTITY_FILES; a file itself otherwise)."""
    metas = [paths.checkpoint_dir(name) / "meta.json" for name in spec.checkpoints_read(cfg)]
    return metas + [f for path in spec.inputs for f in paths.IDENTITY_FILES.get(Path(path), (Path(path),))]


def fingerprint(cfg: Config, spec: StageSpec) -> str:
    config = cfg.to_dict()
    for key in VOLATILE_KEYS:
        config.pop(key, None)
    h = hashlib.sha256(json.dumps({"stage": spec.name, "config": config}, sort_keys=True).encode())
    for path in input_files(cfg, spec):
        if path.is_file():
            h.update(str(path).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


class ResumeState:
    """The resume directory of one stage: what to resume from, under which W&B run id."""

    def __init__(self, cfg: Config, spec: StageSpec, root: Path = paths.RESUME_ROOT) -> None:
        r = cfg.resume
        self.stage, self.dir = spec.name, Path(root) / spec.name
        self.mode = r.mode
        self.every_n_steps = r.every_n_steps
        self.every_n_iterations = r.every_n_iterations
        self.fingerprint = fingerprint(cfg, spec)
        old = self._read()
        self.checkpoint = self.dir / str(old.get("checkpoint") or "none")
        same = old.get("fingerprint") == self.fingerprint
        # a file; a directory under DeepSpeed, which writes its own sharded format
        self.resuming = self.mode != "never" and self.checkpoint.exists() and (same or self.mode == "force")
        self.step = int(old.get("step", 0)) if self.resuming else 0
        if self.resuming or (same and self.mode != "never" and old.get("wandb_id")):
            self.wandb_id = old["wandb_id"]  # a run killed before its first checkpoint keeps its id too
        else:
            self.wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            if global_rank() == 0:  # one process clears a stale run; rank 0 writes the new state
                shutil.rmtree(self.dir, ignore_errors=True)
        self.state = {"stage": self.stage, "fingerprint": self.fingerprint, "wandb_id": self.wandb_id,
                      "step": self.step,
                      "sha256": old.get("sha256") if self.resuming else None,
                      "checkpoint": self.checkpoint.name if self.resuming else None}
        if self.resuming:
            self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        """Refuse a checkpoint that is not the file this stage wrote, or that holds more than tensors and
        plain data. Lightning loads `ckpt_path` with weights_only=True, but not under fsdp/fsdp2, whose
        restore goes through a plain unpickler: so the check comes first, for every strategy."""
        fix = f"delete {self.dir} to start over (or set resume.mode=never)"
        if self.checkpoint.is_file():
            if self.state["sha256"] and file_sha256(self.checkpoint) != self.state["sha256"]:
                raise ValueError(f"{self.checkpoint} is not the checkpoint this stage wrote (its SHA-256 differs "
                                 f"from {self.dir / 'state.json'}): {fix}")
            try:
                torch.load(self.checkpoint, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # an UnpicklingError for foreign objects, anything for a damaged file
                raise ValueError(f"{self.checkpoint} does not load as plain tensors and data ({err}): {fix}") from None

    def _read(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    @property
    def ckpt_path(self) -> str | None:
        return str(self.checkpoint) if self.resuming else None

    def describe(self) -> str:
        if self.resuming:
            return f"resuming {self.stage} from {self.checkpoint} (step {self.step}, W&B run {self.wandb_id})"
        return f"starting {self.stage} (resume checkpoints in {self.dir})"

    def write_state(self, **update) -> None:
        self.state.update(update)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", self.state)


def rng_state() -> dict:
    """Every RNG a training step may draw from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_progress(trainer, pl_module) -> int:
    """Optimizer steps (automatic optimization) or iterations (online RL, manual optimization)."""
    if pl_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


class ResumeCheckpoint(Callback):
    """Writes `step-<N>.ckpt` on schedule; carries the RNG states; stops training on a non-finite loss.

    The losses are checked (one device sync) on logging steps and before every checkpoint, through
    `Objective.check_finite`; the weights before every checkpoint. Must come after the callbacks whose
    state the checkpoint should hold (Lightning saves them all, in list order of their hooks).
    """

    def __init__(self, resume: ResumeState) -> None:
        self.resume = resume
        self._seen = -1

    def state_dict(self) -> dict:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        set_rng_state(state_dict["rng"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = training_progress(trainer, pl_module)
        if step == self._seen:  # accumulating gradients: no optimizer step in this batch
            return
        self._seen = step
        every = self.resume.every_n_steps if pl_module.automatic_optimization else self.resume.every_n_iterations
        due = every > 0 and step % every == 0
        if due or step % max(1, trainer.log_every_n_steps) == 0:
            check_finite(trainer, pl_module, step, self.resume)
        if due:
            self.save(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        check_finite(trainer, pl_module, training_progress(trainer, pl_module), self.resume)

    def save(self, trainer, pl_module, step: int) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f"{self.resume.stage}: parameter {bad[0]} is NaN/inf at step {step}; "
                                     f"{kept(self.resume)}")
        self.resume.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.resume.dir / f".step-{step:08d}.ckpt.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp, weights_only=False)  # the full training state; a collective, rank 0 writes
        if trainer.is_global_zero:
            sha = file_sha256(tmp) if tmp.is_file() else None
            path = self.resume.dir / f"step-{step:08d}.ckpt"
            os.replace(tmp, path)
            self.resume.checkpoint = path
            self.resume.write_state(step=step, sha256=sha, checkpoint=path.name)  # the commit point
            for old in self.resume.dir.glob("step-*.ckpt"):
                if old != path:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()


def kept(resume: ResumeState) -> str:
    if resume.checkpoint.is_file() and resume.state.get("step"):
        return (f"the last good checkpoint (step {resume.state['step']}) is kept at {resume.checkpoint}: lower the "
                "learning rate or check the data, then rerun (resume.mode=force resumes from it under a changed "
                "config)")
    return "no checkpoint was written yet: lower the learning rate or check the data, then rerun"


def check_finite(trainer, pl_module, step: int, resume: ResumeState) -> None:
    """Raise if any training loss since the last check was NaN/inf on any rank (Objective records them)."""
    flag = getattr(pl_module, "nonfinite_loss", None)
    if trainer.strategy.reduce_boolean_decision(flag is not None and bool(flag), all=False):
        raise FloatingPointError(f"{resume.stage}: the training loss became NaN/inf by step {step}; {kept(resume)}")
