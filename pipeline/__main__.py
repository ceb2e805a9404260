"""`python -m pipeline stage=<name> [overrides]`: run a stage from a Hydra composition of conf/.

`-m` makes it a multirun sweep, e.g. `python -m pipeline -m stage=pretrain model.n_layer=2,4`:
each job runs in its own directory (pipeline/harness/sweep.py) as its own W&B run, and the sweep ends
with a table of every job's metrics. The stage function is the one `dvc repro` calls.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.harness.runner import exit_codes, run_stage
from pipeline.harness.sweep import job_directory
from pipeline.paths import CONF_DIR
from stages import registry


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    chain = registry()
    if not cfg.get("stage"):
        print(f"choose a stage: python -m pipeline stage=<{'|'.join(chain.names)}|all> [overrides]", file=sys.stderr)
        raise SystemExit(2)
    OmegaConf.resolve(cfg)
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # a sweep job works in its own output directory, so jobs never overwrite the workspace or each other
    job = job_directory(Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.runtime.cwd)) if in_sweep else nullcontext()
    with exit_codes(str(cfg.stage)), job:
        metrics = run_stage(chain, str(cfg.stage), cfg)
    # a sweeper (e.g. Optuna) minimises the returned value
    value = metrics.get("val_loss") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    main()
