"""Loading the composed configuration, whichever way a stage was started.

`dvc repro` runs `python -m stages.<name>`, which reads the committed `params.yaml` (DVC's Hydra
integration regenerates it from `conf/` under `dvc exp run`). `python -m pipeline` composes `conf/`
with Hydra. Both hand the same DictConfig to the same stage function.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = "params.yaml"
CODE_DIRS = ("pipeline", "stages")  # what a run's code is, beside the config


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate it with `python -m pipeline.params` "
                                "(or `dvc exp run`, which composes conf/ into it)")
    return OmegaConf.load(path)


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose conf/ like DVC's Hydra integration does (interpolations resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


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


def config_hash(cfg: DictConfig) -> str:
    """Hash of the config minus the per-invocation `stage` key: equal for all stages of one run."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("stage", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def run_identity(cfg: DictConfig) -> dict:
    """Who made an output: the pipeline run id, the exact code and config, and the DVC experiment.

    The run id is `run-<commit>-<config hash>` (plus `-dirty<hash>` when the code has uncommitted
    changes), or `run.id` when set: equal for every stage of one `dvc repro`/`dvc exp run` of one
    config, so the W&B group, checkpoint metadata, metrics files and report header all agree. DVC sets
    DVC_EXP_NAME and DVC_EXP_BASELINE_REV for the stages of `dvc exp run`.
    """
    commit, changes, chash = git_commit(), code_changes(), config_hash(cfg)
    derived = f"run-{commit[:7]}-{chash}" + (f"-dirty{changes}" if changes else "")
    explicit = cfg.get("run", {}).get("id") if cfg.get("run") else None
    return {"run_id": str(explicit) if explicit else derived, "git_commit": commit, "git_dirty": changes is not None,
            "config_hash": chash, "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
            "dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV")}


def run_id(cfg: DictConfig) -> str:
    """The pipeline run id (see run_identity): the W&B group shared by every stage of one run."""
    return run_identity(cfg)["run_id"]
