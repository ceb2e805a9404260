"""Loading the composed configuration, whichever way a stage was started.

`dvc repro` runs `python -m stages.<name>`, which reads the committed `params.yaml` (DVC's Hydra
integration regenerates it from `conf/` under `dvc exp run`). `python -m pipeline` composes `conf/`
with Hydra. Both hand the same DictConfig to the same stage function.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = "params.yaml"


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


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def config_hash(cfg: DictConfig) -> str:
    """Hash of the config minus the per-invocation `stage` key: equal for all stages of one run."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("stage", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def run_group(cfg: DictConfig) -> str:
    """The W&B group (pipeline run id) shared by every stage of one pipeline run."""
    if cfg.get("run") and cfg.run.get("group"):
        return str(cfg.run.group)
    return f"run-{git_commit()[:7]}-{config_hash(cfg)}"
