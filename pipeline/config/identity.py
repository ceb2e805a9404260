"""Who made an output: the pipeline run id, from the code's commit (and any uncommitted change) and the config,
and the W&B run of a stage, which carries it (`wandb_init_kwargs`).

The run id is `run-<commit>-<config hash>` (plus `-dirty<hash>` when the code has uncommitted changes), or
`run.id` when set: equal for every stage of one `dvc repro`/`dvc exp run` of one config, so the W&B group,
checkpoint metadata, metrics files and the report header all agree. DVC sets DVC_EXP_NAME and
DVC_EXP_BASELINE_REV for the stages of `dvc exp run`.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.paths import CODE_DIRS, PROJECT_ROOT

if TYPE_CHECKING:
    from pipeline.config.root import Config


def _git(*args: str) -> str | None:
    """stdout of `git <args>` in the project's repository, or None where git or the repository is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def git_commit() -> str:
    """The commit the project's code is checked out at ("unknown" outside a git repository)."""
    return (_git("rev-parse", "HEAD") or "").strip() or "unknown"


def code_changes() -> str | None:
    """A short hash of the code's uncommitted changes (tracked edits and new files under CODE_DIRS),
    or None when the code is exactly the commit's. Config changes are not code: config_hash has them."""
    diff = _git("diff", "HEAD", "--binary", "--", *CODE_DIRS)
    new = _git("ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS)
    if not diff and not new:
        return None
    h = hashlib.sha256((diff or "").encode())
    for name in sorted((new or "").splitlines()):
        path = PROJECT_ROOT / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()[:6]


def config_hash(cfg: Config) -> str:
    """Hash of the config minus the per-invocation `stage` key: equal for all stages of one run."""
    d = cfg.to_dict()
    d.pop("stage", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def run_identity(cfg: Config) -> dict:
    """The run id, the exact code (commit, uncommitted changes) and config (hash), and the DVC experiment."""
    commit, changes, chash = git_commit(), code_changes(), config_hash(cfg)
    derived = f"run-{commit[:7]}-{chash}" + (f"-dirty{changes}" if changes else "")
    return {"run_id": cfg.run.id or derived, "git_commit": commit, "git_dirty": changes is not None,
            "config_hash": chash, "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
            "dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV")}


def run_id(cfg: Config) -> str:
    """The pipeline run id (see run_identity): the W&B group shared by every stage of one run."""
    return run_identity(cfg)["run_id"]


def wandb_init_kwargs(cfg: Config, stage: str) -> dict:
    """`wandb.init` arguments of `stage`'s run: group = the pipeline run id, job_type = the stage, the
    resolved config with the run identity under `pipeline_run`, the DVC experiment (if any) as a tag.
    Lightning's WandbLogger gets them in the training stages (pipeline.training.loggers), the harness
    opens a run with them for the others (pipeline.harness.tracking)."""
    lg = cfg.logger.wandb
    if lg is None:
        raise ValueError("logger has no wandb entry: W&B runs need it (logger=[wandb,dvclive])")
    identity = run_identity(cfg)
    config = cfg.to_dict()
    config["pipeline_run"] = identity
    # absolute: W&B's service process keeps the working directory it started in (a sweep's first job)
    save_dir = Path(lg.save_dir).resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    tags = [f"dvc-exp:{identity['dvc_experiment']}"] if identity["dvc_experiment"] else None
    return {"project": lg.project, "entity": lg.entity, "group": identity["run_id"], "job_type": stage,
            "name": f"{stage}-{identity['run_id']}", "dir": str(save_dir), "config": config, "tags": tags}
