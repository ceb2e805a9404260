"""Loading the composed configuration, whichever way a stage was started.

`dvc repro` runs `python -m stages.<name>`, which reads the committed `params.yaml` (DVC's Hydra
integration regenerates it from `conf/` under `dvc exp run`). `python -m pipeline` composes `conf/`
with Hydra. Both end in the same DictConfig, which `pipeline.config.root.load_config` validates into
the typed config every stage receives.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.paths import CONF_DIR, PARAMS_FILE

PARAMS_COMMAND = "make params"  # how a user regenerates params.yaml (python -m pipeline.config)


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate it with `{PARAMS_COMMAND}` (python -m pipeline.config), "
                                "or let `dvc exp run` compose conf/ into it")
    return OmegaConf.load(path)


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose conf/ like DVC's Hydra integration does (interpolations resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


def write_params(overrides: list[str] | None = None, path: str | Path = PARAMS_FILE) -> Path:
    """params.yaml from conf/ plus `overrides`: what `dvc exp run -S ...` writes."""
    path = Path(path)
    path.write_text(OmegaConf.to_yaml(compose(overrides)), encoding="utf-8")
    return path
