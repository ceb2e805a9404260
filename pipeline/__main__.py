"""`python -m pipeline stage=<name> [overrides]`: run a stage from a Hydra composition of conf/.

`-m` makes it a multirun sweep, e.g. `python -m pipeline -m stage=pretrain model.n_layer=2,4`:
each job runs in its own directory (pipeline/sweep.py) as its own W&B run, and the sweep ends with
a table of every job's metrics. The stage function is the one `dvc repro` calls.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR
from pipeline.runner import run_stage
from pipeline.sweep import job_directory


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    if not cfg.get("stage"):
        print("choose a stage: python -m pipeline stage=<prepare|tokenizer|pretrain|sft|reward|align|"
              "sft_control|export|evaluate|report|all> [overrides]", file=sys.stderr)
        raise SystemExit(2)
    OmegaConf.resolve(cfg)
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # a sweep job works in its own output directory, so jobs never overwrite the workspace or each other
        with job_directory(Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.runtime.cwd)) if in_sweep else nullcontext():
            metrics = run_stage(str(cfg.stage), cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error in stage {cfg.stage!r}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:  # a NaN/inf loss; the last good checkpoint is kept (pipeline.resume)
        print(f"error in stage {cfg.stage!r}: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    # a sweeper (e.g. Optuna) minimises the returned value
    value = metrics.get("val_loss") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    main()
