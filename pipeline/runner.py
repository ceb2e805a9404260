"""Runs a stage by name: environment, validation, the stage's `run(cfg)`, its metrics file and its W&B run.

Every way of starting a stage ends here: `python -m stages.<name>` (dvc repro), `python -m pipeline
stage=<name>` (Hydra, single or multirun) and the tests. A stage module `stages/<name>.py` exposes
`run(cfg) -> dict` returning flat metrics; this module adds the wall time and the pipeline run id
(pipeline.config.run_identity), writes them to `metrics/<name>.json`, then closes the stage's W&B
run with its metrics and artifact lineage (pipeline.tracking).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import PROJECT_ROOT, load_params, run_id
from pipeline.io import write_json
from pipeline.tracking import close_stage_run
from pipeline.validation import validate_stage

STAGES = ("prepare", "tokenizer", "pretrain", "sft", "reward", "align", "sft_control", "export", "evaluate", "report")
METRICS_DIR = Path("metrics")
RESUME_ROOT = Path("outputs/resume")  # a training stage's resume checkpoints (pipeline/resume.py), per stage


def setup_environment(cfg: DictConfig) -> None:
    """Offline-first defaults; the user's environment always wins."""
    logger = cfg.get("logger") or {}
    os.environ.setdefault("WANDB_MODE", str(logger.get("mode") or "offline"))
    if logger.get("name") == "wandb" and os.environ["WANDB_MODE"] == "online":
        from pipeline.wandb_mode import fall_back_offline_without_server
        fall_back_offline_without_server()  # no network: offline files in seconds, not a failure after ~100 s
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(PROJECT_ROOT / ".cache" / "huggingface"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = cfg.get("trainer") or {}
    if trainer.get("num_threads") or trainer.get("matmul_precision"):
        import torch
        if trainer.get("num_threads"):
            torch.set_num_threads(int(trainer.num_threads))
        if trainer.get("matmul_precision"):  # "high" lets fp32 matmuls use TF32 tensor cores on GPUs
            torch.set_float32_matmul_precision(str(trainer.matmul_precision))


def global_rank() -> int:
    """This process's rank under torchrun, SLURM or Lightning's launcher (0 when not distributed).

    Lightning's own record when a stage trained with it (its launcher sets no RANK); otherwise the
    launcher's environment, without importing Lightning (~10 s) into stages that never use it.
    """
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        return int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: choose one of {', '.join(STAGES)} (or `all`)")
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return importlib.import_module(f"stages.{name}")


def run_stage(name: str, cfg: DictConfig) -> dict:
    """Run one stage (or `all` in order) and write metrics/<name>.json."""
    if name == "all":
        return {s: run_stage(s, cfg) for s in STAGES}
    setup_environment(cfg)  # before the stage imports datasets/wandb, which read it at import time
    validate_stage(name, cfg)  # bad config or inputs stop the stage here, before any work or output
    module = stage_module(name)
    start = time.time()
    try:
        metrics = module.run(cfg)
    except BaseException:
        close_stage_run(cfg, name, None)  # a W&B run the stage opened ends as failed
        raise
    if not any(isinstance(v, dict) for v in metrics.values()):  # evaluate's table stays {checkpoint: {...}}
        metrics = {**metrics, "wall_time_s": round(time.time() - start, 2), "run_id": run_id(cfg)}
    if global_rank() == 0:  # under DDP/FSDP every rank runs the stage; one writes its metrics
        write_json(METRICS_DIR / f"{name}.json", metrics)
        forget_resume_state(name)
        close_stage_run(cfg, name, metrics)  # summary, artifacts and lineage (pipeline.tracking)
    return metrics


def forget_resume_state(name: str) -> None:
    """The stage's outputs are complete: its resume checkpoint (pipeline.resume) must not be reused."""
    resume_dir = RESUME_ROOT / name
    if resume_dir.is_dir():
        shutil.rmtree(resume_dir)


def main(name: str) -> None:
    """Entry point of `python -m stages.<name>`: the committed params.yaml is the config."""
    try:
        run_stage(name, load_params())
    except (ValueError, FileNotFoundError) as err:
        print(f"error in stage {name!r}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:  # a NaN/inf loss (pipeline.resume): the last good checkpoint is kept
        print(f"error in stage {name!r}: {err}", file=sys.stderr)
        raise SystemExit(3) from None
