"""Resuming a training stage: periodic checkpoints, their identity, RNG state, continuing a finished run,
and SLURM's requeue signal.

Every training stage (its spec says `trains`) trains through `pipeline.training.trainer.fit`, which
keeps `outputs/resume/<stage>/`:

- `step-<N>.ckpt`: a Lightning checkpoint (weights, optimizer, LR schedule, loop progress, the
  datamodule's data position, the callbacks' state incl. every RNG and the stage's name), written every
  `resume.every_n_steps` optimizer steps (online RL: `resume.every_n_iterations` iterations), at the last
  step (the final state), and when SLURM asks for the job back, to a temp file renamed into place, and
  only once the weights and the losses since the last check are finite: a crash never leaves a
  half-written or NaN checkpoint behind. The newest `resume.keep` stay.
- `state.json`: the run's fingerprint (the resolved config minus `resume`/`logger`/`run`/`stage`, and
  the bytes of what identifies its inputs: the meta.json of every checkpoint the stage reads under this
  config and the identity file of every other input, per its StageSpec), the inputs' part of it alone,
  the W&B run id, the current checkpoint's name, step and SHA-256, whether it is the final state, the
  kept checkpoints (oldest first), and `done` once the runner wrote the stage's outputs. It is replaced
  atomically after the new checkpoint is complete, and only then are the checkpoints beyond `keep`
  deleted, so a kill at any instant leaves a state that names a whole checkpoint.

A rerun (`dvc repro` runs the stage's command again; DVC never touches `outputs/`) with the same
fingerprint resumes a killed run from its checkpoint under the same W&B run id (`resume="allow"`), once
its SHA-256 matches and it loads as plain tensors and data; a changed config or upstream, or a finished
run (`done`: a plain rerun trains it again), starts over. `resume.mode`: `auto` (that), `never` (always
start over), `force` (resume a killed run although the fingerprint changed, e.g. with a lower learning
rate after a NaN). `resume.ckpt_path`: `last` continues from the newest checkpoint, a finished run's final
state included, under any config of the stage (raised max_steps: Lightning restores the loops and trains
the extra steps, the LR schedule follows the new max_steps) but not on changed inputs, where the stage
starts over; a path continues from that checkpoint (a kept one, or any Lightning checkpoint of the stage;
one that records another stage is ignored by this one, so `stage=all` applies it to its own stage).

Under SLURM (Lightning's SLURMEnvironment detects it), Lightning's own requeue is off (it would save
its own hpc checkpoint in the signal handler, mid-step and per rank, and restore from it behind this
module's back). Instead `RequeueSignal`'s handler of `resume.requeue_signal` only raises a flag; at the
next optimizer step every rank agrees on it (one reduce), the checkpoint is written and committed as
above, global rank 0 runs `scontrol requeue <job>`, and every rank raises `Requeued` (exit code 75, no
outputs): the requeued job's rerun resumes from that checkpoint in `auto` mode.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import threading
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
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: the job comes back (SLURM requeue) and resumes
STEP_FILE = re.compile(r"step-(\d+)\.ckpt")
# Lightning looks for resumable *dataloaders*; ours resume through the datamodule's state (see datamodules.py)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class Requeued(Exception):
    """SLURM asked for the job back: the checkpoint is committed and the job requeued (exit code 75)."""


def input_files(cfg: Config, spec: StageSpec) -> list[Path]:
    """The files whose bytes identify what `spec`'s stage reads under `cfg`: each checkpoint's meta.json and
    each other input's identity file (paths.IDENTITY_FILES; a file itself otherwise)."""
    metas = [paths.checkpoint_dir(name) / "meta.json" for name in spec.checkpoints_read(cfg)]
    return metas + [f for path in spec.inputs for f in paths.IDENTITY_FILES.get(Path(path), (Path(path),))]


def _hash_inputs(h, cfg: Config, spec: StageSpec):
    for path in input_files(cfg, spec):
        if path.is_file():
            h.update(str(path).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h


def fingerprint(cfg: Config, spec: StageSpec) -> str:
    config = cfg.to_dict()
    for key in VOLATILE_KEYS:
        config.pop(key, None)
    h = hashlib.sha256(json.dumps({"stage": spec.name, "config": config}, sort_keys=True).encode())
    return _hash_inputs(h, cfg, spec).hexdigest()[:16]


def inputs_fingerprint(cfg: Config, spec: StageSpec) -> str:
    """The inputs' part of the fingerprint alone: `resume.ckpt_path=last` continues under a changed config of
    the stage, never on retrained upstream checkpoints (the stages downstream of a change start over)."""
    return _hash_inputs(hashlib.sha256(spec.name.encode()), cfg, spec).hexdigest()[:16]


def load_checked(path: Path, fix: str) -> dict | None:
    """`path` loaded as plain tensors and data (memory-mapped), None for a directory (DeepSpeed's sharded format);
    ValueError naming the file otherwise. Lightning loads `ckpt_path` with weights_only=True, but not under
    fsdp/fsdp2, whose restore goes through a plain unpickler: so the check comes first, for every strategy."""
    if path.is_dir():
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an UnpicklingError for foreign objects, anything for a damaged file
        raise ValueError(f"{path} does not load as plain tensors and data ({err}): {fix}") from None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was written at: in its name (step-<N>.ckpt), else its Lightning global_step."""
    match = STEP_FILE.fullmatch(path.name)
    if match:
        return int(match.group(1))
    return int((load_checked(path, "") or {}).get("global_step", 0))


class ResumeState:
    """The resume directory of one stage: what to resume from, under which W&B run id."""

    def __init__(self, cfg: Config, spec: StageSpec, root: Path = paths.RESUME_ROOT) -> None:
        r = self.config = cfg.resume
        self.stage, self.dir = spec.name, Path(root) / spec.name
        self.mode, self.keep, self.requeue_signal = r.mode, r.keep, r.requeue_signal
        self.every_n_steps = r.every_n_steps
        self.every_n_iterations = r.every_n_iterations
        self.fingerprint = fingerprint(cfg, spec)
        self.inputs = inputs_fingerprint(cfg, spec)
        self.notes: list[str] = []
        old = self._read()
        none = {"checkpoint": None, "step": 0, "sha256": None, "final": False}
        current = {**none, **{k: old[k] for k in none if old.get(k) is not None}}
        kept = old.get("kept") or ([{k: current[k] for k in ("checkpoint", "step", "sha256")}]
                                   if current["checkpoint"] else [])
        chosen = self._choose(old, current, r.ckpt_path, root)
        self.resuming = chosen is not None
        self.checkpoint = chosen if chosen is not None else self.dir / "none"
        entry = next((e for e in kept if self.checkpoint == self.dir / str(e["checkpoint"])), None)
        self.step = (int(entry["step"]) if entry else checkpoint_step(self.checkpoint)) if self.resuming else 0
        same = old.get("fingerprint") == self.fingerprint
        if old.get("wandb_id") and (self.resuming or (same and self.mode != "never" and not old.get("done"))):
            self.wandb_id = old["wandb_id"]  # a run killed before its first checkpoint keeps its id too
        else:
            self.wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if not self.resuming:
            current, kept = none, []
            if self.wandb_id != old.get("wandb_id") and global_rank() == 0:
                shutil.rmtree(self.dir, ignore_errors=True)  # one process clears a stale run; rank 0 writes anew
        elif self.checkpoint != self.dir / str(current["checkpoint"]):
            # an older kept checkpoint, or one from elsewhere: the kept ones after it belong to an abandoned future
            # (pruned at the next commit); state.json names the chosen one if kept, else none until the next commit
            kept = [e for e in kept if int(e["step"]) < self.step] + ([entry] if entry else [])
            current = {**entry, "final": False} if entry else none
        self.final = self.resuming and bool(current["final"])
        self.state = {"stage": self.stage, "fingerprint": self.fingerprint, "inputs": self.inputs,
                      "wandb_id": self.wandb_id, **current, "done": False, "kept": kept}
        if self.resuming:
            self._check_checkpoint(entry["sha256"] if entry else None)

    def _choose(self, old: dict, current: dict, ckpt_path: str | None, root: Path) -> Path | None:
        """The checkpoint this run continues from (None: it starts over), as resume.mode and ckpt_path say."""
        named = self.dir / str(current["checkpoint"] or "none")  # a file; a directory under DeepSpeed
        if ckpt_path == "last":
            if not named.exists():
                self.notes.append(f"resume.ckpt_path=last: {self.stage} has no checkpoint in {self.dir} to continue "
                                  "from; starting over")
                return None
            if old.get("inputs") != self.inputs:
                self.notes.append(f"resume.ckpt_path=last: the inputs of {self.stage} changed since {named} was "
                                  "written (an upstream stage was retrained); starting over")
                return None
            return named
        if ckpt_path is not None:
            path = self.config.checkpoint_file(self.stage, root)
            if path is not None:
                return path
            self.notes.append(f"resume.ckpt_path {ckpt_path} is another stage's checkpoint: {self.stage} ignores it")
        same = old.get("fingerprint") == self.fingerprint
        resumable = self.mode != "never" and named.exists() and not old.get("done")
        return named if resumable and (same or self.mode == "force") else None

    def _check_checkpoint(self, sha: str | None) -> None:
        """Refuse a checkpoint that is not the file this stage wrote, or that holds more than tensors and
        plain data (load_checked)."""
        fix = f"delete {self.dir} to start over (or set resume.mode=never)"
        if self.checkpoint.is_file() and sha and file_sha256(self.checkpoint) != sha:
            raise ValueError(f"{self.checkpoint} is not the checkpoint this stage wrote (its SHA-256 differs "
                             f"from {self.dir / 'state.json'}): {fix}")
        load_checked(self.checkpoint, fix)

    def _read(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    @property
    def ckpt_path(self) -> str | None:
        return str(self.checkpoint) if self.resuming else None

    def describe(self) -> str:
        lines = [*self.notes]
        if self.resuming:
            final = ", the final state of a finished run" if self.final else ""
            lines.append(f"resuming {self.stage} from {self.checkpoint} (step {self.step}, W&B run {self.wandb_id}"
                         f"{final})")
        else:
            lines.append(f"starting {self.stage} (resume checkpoints in {self.dir})")
        return "\n".join(lines)

    def write_state(self, **update) -> None:
        self.state.update(update)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", self.state)

    def commit(self, path: Path, step: int, sha: str | None, final: bool) -> None:
        """Name `path` (complete, in place) in state.json, the commit point; then delete what `keep` leaves out."""
        kept = [e for e in self.state["kept"] if e["checkpoint"] != path.name]
        kept = [*kept, {"checkpoint": path.name, "step": step, "sha256": sha}][-self.keep:]
        self.checkpoint = path
        self.write_state(checkpoint=path.name, step=step, sha256=sha, final=final, kept=kept)
        names = {e["checkpoint"] for e in kept}
        for old in self.dir.glob("step-*.ckpt"):
            if old.name not in names:
                shutil.rmtree(old) if old.is_dir() else old.unlink()


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


def is_last_batch(trainer, batch_idx: int) -> bool:
    """Training stops after this batch: `max_steps` reached, or the last batch of the last epoch."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


class RequeueSignal:
    """Under SLURM, while training: a handler of `resume.requeue_signal` that only raises a flag (a signal arrives
    between any two instructions, mid-collective too); ResumeCheckpoint acts on it at the next optimizer step.
    Outside `with`, the handler before it (submitit's, which requeues a job the next run resumes) applies."""

    def __init__(self, resume: ResumeState) -> None:
        self.resume, self.signum = resume, getattr(signal, f"SIG{resume.requeue_signal}")
        self.received, self._before = False, None

    def __enter__(self) -> RequeueSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self._before = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            signal.signal(self.signum, self._before)
            self._before = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def asked(self, trainer) -> bool:
        """Whether any rank got the signal: a collective, so every rank stops at the same step."""
        return trainer.strategy.reduce_boolean_decision(self.received, all=False)

    def requeue(self, trainer, step: int) -> None:
        """The checkpoint of `step` is committed: requeue the job (global rank 0) and stop every rank."""
        job = slurm_job_id()
        done = "not requeued (no SLURM job id)"
        if trainer.is_global_zero and job:
            try:
                proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                done = "requeued" if proc.returncode == 0 else f"not requeued (scontrol: {proc.stderr.strip()})"
            except (OSError, subprocess.TimeoutExpired) as err:
                done = f"not requeued (scontrol: {err})"
        elif job:
            done = "requeued by global rank 0"
        raise Requeued(f"{self.resume.stage}: SIG{self.resume.requeue_signal} (SLURM wants the job back): the "
                       f"checkpoint of step {step} is committed in {self.resume.dir}; job {job} {done}; its rerun (or "
                       "any rerun of the same config) resumes from it")


def slurm_job_id() -> str | None:
    """The job `scontrol requeue` takes: <array job>_<task> for an array job, else SLURM_JOB_ID."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class ResumeCheckpoint(Callback):
    """Writes `step-<N>.ckpt` on schedule, at the last step and on SLURM's requeue signal; carries the RNG states
    and the stage's name; stops training on a non-finite loss.

    The losses are checked (one device sync) on logging steps and before every checkpoint, through
    `Objective.check_finite`; the weights before every checkpoint. Must come after the callbacks whose
    state the checkpoint should hold (Lightning saves them all, in list order of their hooks).
    """

    def __init__(self, resume: ResumeState, requeue: RequeueSignal | None = None) -> None:
        self.resume, self.requeue = resume, requeue
        self._seen = -1

    def state_dict(self) -> dict:
        return {"rng": rng_state(), "stage": self.resume.stage}

    def load_state_dict(self, state_dict: dict) -> None:
        set_rng_state(state_dict["rng"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = training_progress(trainer, pl_module)
        if step == self._seen:  # accumulating gradients: no optimizer step in this batch
            return
        self._seen = step
        every = self.resume.every_n_steps if pl_module.automatic_optimization else self.resume.every_n_iterations
        final = is_last_batch(trainer, batch_idx)  # the final state, for resume.ckpt_path=last
        requeue = self.requeue is not None and self.requeue.asked(trainer)
        save = (every > 0 and step % every == 0) or final or requeue
        if save or step % max(1, trainer.log_every_n_steps) == 0:
            check_finite(trainer, pl_module, step, self.resume)
        if save:
            self.save(trainer, pl_module, step, final=final)
        if requeue:
            self.requeue.requeue(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        check_finite(trainer, pl_module, training_progress(trainer, pl_module), self.resume)

    def save(self, trainer, pl_module, step: int, final: bool = False) -> None:
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
            if path.is_dir():  # DeepSpeed's directory of an abandoned future (see ResumeState): not named anywhere
                shutil.rmtree(path)
            os.replace(tmp, path)
            self.resume.commit(path, step, sha, final)


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
