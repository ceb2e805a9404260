"""Each stage's W&B run: who made it (the run identity), what it measured, what it used and what it made.

Every stage has a run in the pipeline run's group (job_type = the stage): the training stages get
theirs from Lightning's WandbLogger, the others from `close_stage_run`, which the runner calls once
the stage's outputs are written. It then puts the stage's metrics in the run summary and logs the
stage's artifacts before finishing the run.

Lineage follows dvc.yaml: the objects are the entries of its `artifacts:` registry (prepared data,
token shards, the tokenizer, every checkpoint) plus the evaluation table and the report (EXTRA). A
stage *makes* an object when one of its outs, metrics or plots lies under the object's path, and
*uses* one when one of its deps does. A made object is logged as a new version (aliased with the
run id); a used one is logged as the same content with `use_after_commit`, which is what
`Run.use_artifact(draft)` does: W&B deduplicates by digest, so the use resolves to the producer's
version and the two runs are linked (data -> tokenizer -> pretrain -> sft -> reward -> aligned ->
evaluation -> report). Offline the SDK refuses `use_artifact` outright (it cannot look names up), so
there the same record goes through `Run._log_artifact`, to be linked when `wandb sync` uploads it.

`logger.artifacts`: `reference` (default) records each file's MD5 and `file://` location, not its
bytes, which DVC's cache and remote already hold; `files` uploads copies; `none` logs no artifacts.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PROJECT_ROOT, run_identity
from pipeline.io import flatten

DVC_FILE = PROJECT_ROOT / "dvc.yaml"
LOGGERS = ("wandb", "none")
ARTIFACT_MODES = ("reference", "files", "none")
# W&B only: git-tracked files, so not in DVC's registry (whose entries `dvc artifacts get` downloads)
EXTRA = {
    "evaluation": {"path": "metrics/evaluate.json", "type": "evaluation",
                   "desc": "Every checkpoint scored on the same eval prompts (metrics/evaluate.json)"},
    "report": {"path": "reports", "type": "report",
               "desc": "The lifecycle report: report.md, its figures and accuracy.json"},
}


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    path: str
    type: str
    description: str = ""
    labels: tuple[str, ...] = ()

    def covers(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


def registry(dvc: dict) -> dict[str, ArtifactSpec]:
    """The objects lineage is recorded for: the `artifacts:` entries of dvc.yaml (parsed), then EXTRA."""
    entries = {**(dvc.get("artifacts") or {}), **EXTRA}
    return {name: ArtifactSpec(name, e["path"], e.get("type") or "model", e.get("desc", ""), tuple(e.get("labels", ())))
            for name, e in entries.items()}


def _paths(entries: list) -> list[str]:
    """The paths of a dvc.yaml stage's deps/outs/metrics/plots list (each a path or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def stage_lineage(stage: str, dvc_file: Path = DVC_FILE) -> tuple[list[ArtifactSpec], list[ArtifactSpec]]:
    """(the objects `stage` uses, the objects it makes), from its dvc.yaml deps and outputs."""
    dvc = yaml.safe_load(dvc_file.read_text())
    spec = (dvc.get("stages") or {}).get(stage) or {}
    deps = _paths(spec.get("deps"))
    made = [p for key in ("outs", "metrics", "plots") for p in _paths(spec.get(key))]
    objects = registry(dvc).values()
    return ([a for a in objects if any(a.covers(p) for p in deps)],
            [a for a in objects if any(a.covers(p) for p in made)])


def wandb_init_kwargs(cfg: DictConfig, stage: str) -> dict:
    """`wandb.init` arguments of `stage`'s run: group = the pipeline run id, job_type = the stage, the
    resolved config with the run identity under `pipeline_run`, the DVC experiment (if any) as a tag."""
    lg = cfg.logger
    identity = run_identity(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["pipeline_run"] = identity
    # absolute: W&B's service process keeps the working directory it started in (a sweep's first job)
    save_dir = Path(lg.get("save_dir", ".")).resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    tags = [f"dvc-exp:{identity['dvc_experiment']}"] if identity["dvc_experiment"] else None
    return {"project": lg.project, "entity": lg.get("entity"), "group": identity["run_id"], "job_type": stage,
            "name": f"{stage}-{identity['run_id']}", "dir": str(save_dir), "config": config, "tags": tags}


def logger_name(cfg: DictConfig) -> str:
    """`logger.name`: wandb or none (every stage logs, so a typo must stop the first one)."""
    name = str((cfg.get("logger") or {}).get("name", "none"))
    if name not in LOGGERS:
        raise ValueError(f"logger.name {name!r} is unknown: choose wandb or none (logger=wandb|none)")
    return name


def artifact_mode(cfg: DictConfig) -> str:
    mode = str((cfg.get("logger") or {}).get("artifacts", "reference"))
    if mode not in ARTIFACT_MODES:
        raise ValueError(f"logger.artifacts {mode!r} is unknown: choose one of {', '.join(ARTIFACT_MODES)} "
                         "(conf/logger/wandb.yaml, or logger.artifacts=...)")
    return mode


def build_artifact(spec: ArtifactSpec, mode: str, metadata: dict | None = None):
    """A draft W&B artifact holding `spec.path` (a file or a directory) by reference or by copy."""
    import wandb

    path = Path(spec.path)
    art = wandb.Artifact(spec.name, type=spec.type, description=spec.description or None, metadata=metadata)
    if mode == "files":
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
    else:  # the file's MD5 is recorded; its bytes stay where DVC keeps them
        art.add_reference(path.resolve().as_uri(), name=None if path.resolve().is_dir() else path.name)
    return art


def log_lineage(run, cfg: DictConfig, stage: str, metrics: dict) -> dict[str, list[str]]:
    """Record on `run` the objects `stage` used and made (see the module doc); returns their names."""
    mode = artifact_mode(cfg)
    if mode == "none":
        return {"used": [], "made": []}
    used, made = stage_lineage(stage)
    done: dict[str, list[str]] = {"used": [], "made": []}
    for spec in used:
        if not Path(spec.path).exists():  # an optional input this configuration does not have
            continue
        draft = build_artifact(spec, "reference")  # the same digest as the producer's copy, without copying
        if run.offline:  # use_artifact raises offline; this writes the record it would send
            run._log_artifact(draft, use_after_commit=True, is_user_created=True)
        else:
            run.use_artifact(draft)
        done["used"].append(spec.name)
    identity = run_identity(cfg)
    for spec in made:
        if not Path(spec.path).exists():
            continue
        meta = {**identity, "stage": stage, "path": spec.path, "labels": list(spec.labels),
                "metrics": flatten(metrics, sep="/")}
        run.log_artifact(build_artifact(spec, mode, meta), aliases=[identity["run_id"]])
        done["made"].append(spec.name)
    return done


def close_stage_run(cfg: DictConfig, stage: str, metrics: dict | None) -> None:
    """Finish `stage`'s W&B run; on success (`metrics` given) first put the metrics in its summary and
    log its artifacts, opening the run if the stage had none (the stages that do not train)."""
    if logger_name(cfg) != "wandb":
        return
    wandb = sys.modules.get("wandb")  # imported by the stage if it opened a run
    run = wandb.run if wandb else None
    if metrics is None or getattr(run, "disabled", False):  # failed, or WANDB_MODE=disabled (a no-op run)
        if run is not None:
            run.finish(exit_code=0 if metrics is not None else 1)
        return
    if run is None:
        if os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb
        run = wandb.init(**wandb_init_kwargs(cfg, stage))
    run.summary.update(flatten(metrics, sep="/"))  # evaluate's {checkpoint: {metric}} as checkpoint/metric
    if any(isinstance(v, dict) for v in metrics.values()):  # evaluate: one row per checkpoint
        rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "verdict"}
        columns = sorted({c for row in rows.values() for c in row if "/" not in c})
        run.log({f"{stage}/table": wandb.Table(columns=["checkpoint", *columns],
                                               data=[[name, *(row.get(c) for c in columns)]
                                                     for name, row in rows.items()])})
    logged = log_lineage(run, cfg, stage, metrics)
    run.finish()
    if logged["used"] or logged["made"]:
        print(f"W&B lineage of {stage}: used {', '.join(logged['used']) or 'nothing'}; "
              f"made {', '.join(logged['made']) or 'nothing'}", file=sys.stderr)
