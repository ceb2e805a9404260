"""`python -m pipeline stage=<name> [overrides]`: run a stage from a Hydra composition of conf/.

`-m` makes it a multirun sweep, e.g. `python -m pipeline -m stage=pretrain model.n_layer=2,4`;
each job is its own W&B run. The stage function is the one `dvc repro` calls.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR
from pipeline.runner import run_stage


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    if not cfg.get("stage"):
        print("choose a stage: python -m pipeline stage=<prepare|tokenizer|pretrain|sft|reward|align|"
              "sft_control|evaluate|report|all> [overrides]", file=sys.stderr)
        raise SystemExit(2)
    OmegaConf.resolve(cfg)
    try:
        metrics = run_stage(str(cfg.stage), cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error in stage {cfg.stage!r}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # a sweeper (e.g. Optuna) minimises the returned value
    value = metrics.get("val_loss") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    main()
