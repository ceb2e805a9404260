"""Each stage's W&B run: who made it (the run identity), what it measured, what it used and what it made.

Every stage has a run in the pipeline run's group (job_type = the stage): the training stages get
theirs from Lightning's WandbLogger (pipeline.training.loggers), the others from `close_stage_run`,
which the runner calls once the stage's outputs are written. It then puts the stage's metrics in the
run summary and logs the stage's artifacts before finishing the run.

Lineage follows the chain (pipeline.registry): the objects are the chain's artifacts (prepared data,
token shards, the tokenizer, every checkpoint, the evaluation table, the report). A stage *makes* an
object when one of its outputs lies under the object's path, and *uses* one when one of the inputs it
reads under this config does. A made object is logged as a new version (aliased with the run id); a used
one is logged as the same content with `use_after_commit`, which is what `Run.use_artifact(draft)`
does: W&B deduplicates by digest, so the use resolves to the producer's version and the two runs are
linked (data -> tokenizer -> pretrain -> sft -> reward -> aligned -> evaluation -> report). Offline the
SDK refuses `use_artifact` outright (it cannot look names up), so there the same record goes through
`Run._log_artifact`, to be linked when `wandb sync` uploads it.

`logger.wandb.artifacts`: `reference` (default) records each file's MD5 and `file://` location, not its
bytes, which DVC's cache and remote already hold; `files` uploads copies; `none` logs no artifacts.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.config.identity import run_identity, wandb_init_kwargs
from pipeline.io import flatten
from pipeline.registry import Artifact, Chain, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

log = logging.getLogger(__name__)


def stage_lineage(chain: Chain, spec: StageSpec, cfg: Config) -> tuple[list[Artifact], list[Artifact]]:
    """(the objects `spec`'s stage uses under `cfg`, the objects it makes)."""
    used = [*spec.inputs, *(paths.checkpoint_dir(n) for n in spec.checkpoints_read(cfg))]
    objects = chain.artifacts()
    return ([a for a in objects if any(a.covers(p) for p in used)],
            [a for a in objects if any(a.covers(p) for p in spec.made())])


def build_artifact(spec: Artifact, mode: str, metadata: dict | None = None):
    """A draft W&B artifact holding `spec.path` (a file or a directory) by reference or by copy."""
    import wandb

    path = Path(spec.path)
    art = wandb.Artifact(spec.name, type=spec.type, description=spec.desc or None, metadata=metadata)
    if mode == "files":
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
    else:  # the file's MD5 is recorded; its bytes stay where DVC keeps them
        art.add_reference(path.resolve().as_uri(), name=None if path.resolve().is_dir() else path.name)
    return art


def log_lineage(run, chain: Chain, spec: StageSpec, cfg: Config, metrics: dict) -> dict[str, list[str]]:
    """Record on `run` the objects the stage used and made (see the module doc); returns their names.

    It runs after the stage's outputs are written, so an object that cannot be recorded (a directory W&B cannot
    walk: a symbolic link loop in it) is left out with a warning, never failing the finished stage."""
    mode = cfg.logger.wandb.artifacts
    if mode == "none":
        return {"used": [], "made": []}
    used, made = stage_lineage(chain, spec, cfg)
    done: dict[str, list[str]] = {"used": [], "made": []}
    identity = run_identity(cfg)

    def use(art: Artifact) -> None:
        draft = build_artifact(art, "reference")  # the same digest as the producer's copy, without copying
        if run.offline:  # use_artifact raises offline; this writes the record it would send
            run._log_artifact(draft, use_after_commit=True, is_user_created=True)
        else:
            run.use_artifact(draft)

    def make(art: Artifact) -> None:
        meta = {**identity, "stage": spec.name, "path": art.path, "labels": list(art.labels),
                "metrics": flatten(metrics, sep="/")}
        run.log_artifact(build_artifact(art, mode, meta), aliases=[identity["run_id"]])

    for how, arts, record in (("used", used, use), ("made", made, make)):
        for art in arts:
            if not Path(art.path).exists():  # an optional input this configuration does not have
                continue
            try:
                record(art)
            except Exception as err:  # W&B's own errors vary (OSError walking a directory, its API's errors)
                log.warning("W&B lineage of %s: %s (%s) not recorded: %s", spec.name, art.name, art.path, err)
                continue
            done[how].append(art.name)
    return done


def close_stage_run(chain: Chain, spec: StageSpec, cfg: Config, metrics: dict | None, exit_code: int = 1) -> None:
    """Finish the stage's W&B run; on success (`metrics` given) first put the metrics in its summary and
    log its artifacts, opening the run if the stage had none (the stages that do not train). A run that did not
    finish ends with `exit_code` (1, or 128 + the signal that stopped it)."""
    if cfg.logger.wandb is None:  # W&B runs and lineage come with the wandb logger only
        return
    wandb = sys.modules.get("wandb")  # imported by the stage if it opened a run
    run = wandb.run if wandb else None
    if metrics is None or getattr(run, "disabled", False):  # failed, or WANDB_MODE=disabled (a no-op run)
        if run is not None:
            run.finish(exit_code=0 if metrics is not None else exit_code)
        return
    if run is None:
        if os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb
        run = wandb.init(**wandb_init_kwargs(cfg, spec.name))
    run.summary.update(flatten(metrics, sep="/"))  # evaluate's {checkpoint: {metric}} as checkpoint/metric
    if any(isinstance(v, dict) for v in metrics.values()):  # evaluate: one row per checkpoint
        rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "verdict"}
        columns = sorted({c for row in rows.values() for c in row if "/" not in c})
        run.log({f"{spec.name}/table": wandb.Table(columns=["checkpoint", *columns],
                                                   data=[[name, *(row.get(c) for c in columns)]
                                                         for name, row in rows.items()])})
    logged = log_lineage(run, chain, spec, cfg, metrics)
    run.finish()
    if logged["used"] or logged["made"]:
        log.info("W&B lineage of %s: used %s; made %s", spec.name, ", ".join(logged["used"]) or "nothing",
                 ", ".join(logged["made"]) or "nothing")
