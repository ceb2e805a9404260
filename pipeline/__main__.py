"""`python -m pipeline stage=<name> [overrides]`: run a stage from a Hydra composition of conf/.

`-m` makes it a multirun sweep, e.g. `python -m pipeline -m stage=pretrain model.n_layer=2,4`:
each job runs in its own directory (pipeline/harness/sweep.py) as its own W&B run, and the sweep ends
with a table of every job's metrics. The stage function is the one `dvc repro` calls.

A single run works in its own directory too, Hydra's run directory (outputs/hydra/<date-time>/), reading
the workspace's data and checkpoints through links: a smoke run (`stage=all experiment=micro`) or a
one-off override never overwrites what DVC tracks. Writing into the workspace is asked for by naming it
as the run directory, `hydra.run.dir=.` (for a sweep, `hydra.sweep.dir=. hydra.sweep.subdir=.`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config.load import check_overrides
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
    # every run works in its own output directory, so no run overwrites the workspace or another run
    out, workspace = Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.runtime.cwd)
    with exit_codes(str(cfg.stage)), job_directory(out, workspace):
        metrics = run_stage(chain, str(cfg.stage), cfg)
    if hydra_cfg.mode != RunMode.MULTIRUN and out.resolve() != workspace.resolve():
        print(f"outputs in {os.path.relpath(out, workspace)}/ (the workspace's are untouched: hydra.run.dir=. "
              "writes there)", file=sys.stderr)
    # a sweeper (e.g. Optuna) minimises the returned value
    value = metrics.get("val_loss") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def check_command_line() -> None:
    """A misspelt override is refused before Hydra starts, naming the nearest setting, exit code 2."""
    try:
        check_overrides(sys.argv[1:])
    except ValueError as err:
        print(f"error in the overrides: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    check_command_line()
    main()
