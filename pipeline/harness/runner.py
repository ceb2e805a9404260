"""Runs a stage of the chain: its config, environment, input checks, `run`, metrics file and W&B run.

Every way of starting a stage ends here: `python -m stages.<name>` (dvc repro), `python -m pipeline
stage=<name>` (Hydra, single or multirun) and the tests. In order: the config is checked whole
(pipeline.config.root), the environment set up, the stage's own checks of its inputs run (its
module's `check`), then its `run(cfg, spec)`, whose flat metrics get the wall time and the run id and go
to `metrics/<name>.json`; last, the stage's W&B run is closed with its metrics and artifact lineage
(pipeline.harness.tracking). It all runs inside pipeline.logs.stage_logging (a concise console, a DEBUG file per
run in outputs/logs/<stage>/) and ends with one console line of the stage's time and key metrics. A refused
config or input stops the stage before any work, exit code 2; a NaN/inf loss stops training with the last good
checkpoint kept, exit code 3; SLURM's requeue signal stops it with a checkpoint committed and the job requeued,
exit code 75 (pipeline.training.resume). Ctrl-C (SIGINT) or SIGTERM stops it, exit code 130 or 143, its W&B run
closed with that code and its resume checkpoints kept. A stage that does not finish, for any of these reasons or
another, leaves its previous outputs in place (pipeline.harness.previous).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from pipeline import paths
from pipeline.config.identity import run_id
from pipeline.config.load import load_params
from pipeline.config.root import Config, load_config
from pipeline.dist import global_rank
from pipeline.harness.previous import kept_on_failure
from pipeline.harness.tracking import close_stage_run
from pipeline.io import write_json
from pipeline.logs import install_console, stage_logging, summary_line
from pipeline.registry import Chain, Stage, StageSpec

log = logging.getLogger(__name__)


def setup_environment(cfg: Config) -> None:
    """Offline-first defaults; the user's environment always wins."""
    wandb = cfg.logger.wandb
    os.environ.setdefault("WANDB_MODE", wandb.mode if wandb else "offline")
    if wandb and os.environ["WANDB_MODE"] == "online":
        from pipeline.harness.wandb_mode import fall_back_offline_without_server
        fall_back_offline_without_server()  # no network: offline files in seconds, not a failure after ~100 s
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(paths.HF_HOME))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # datasets' tqdm bars, piped, are a line per redraw (read at its import)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    t = cfg.trainer
    if t.num_threads or t.matmul_precision:
        import torch
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.matmul_precision:  # "high" lets fp32 matmuls use TF32 tensor cores on GPUs
            torch.set_float32_matmul_precision(t.matmul_precision)


def run_stage(chain: Chain, name: str, raw: Any) -> dict:
    """Run stage `name` of `chain` (or `all` of them, in order) on the composed config `raw`."""
    install_console()  # even a config refused before the stage's log file opens is reported on the console
    if name == "all":
        cfg = load_config(raw)
        return {stage.name: run_stage(chain, stage.name, cfg) for stage in chain}
    stage = chain[name]
    replaced = stage.spec.replaced()
    rewritten = [p for p in stage.spec.made() if p not in replaced]
    with kept_on_failure(name, replaced, rewritten) if global_rank() == 0 else nullcontext():
        return _run(chain, stage, load_config(raw))  # a bad config stops here, before anything


def _run(chain: Chain, stage: Stage, cfg: Config) -> dict:
    name = stage.name
    with stage_logging(name) as log_path:
        log.debug("config of run %s, log file %s", run_id(cfg), log_path)
        setup_environment(cfg)  # before the stage imports datasets/wandb, which read it at import time
        if stage.spec.trains:  # an accelerator or device count this machine lacks, before Lightning is started
            from pipeline.inference.placement import check_placement
            check_placement(cfg.trainer)
        stage.check(cfg)  # bad inputs stop the stage here, before any work or output
        check_resume_path(cfg, stage.spec)
        start = time.time()
        try:
            metrics = stage.run(cfg)
        except BaseException:  # a W&B run the stage opened ends as failed, or with the code of the signal
            close_stage_run(chain, stage.spec, cfg, None, exit_code=interrupt_exit_code() or 1)
            raise
        seconds = time.time() - start
        if not any(isinstance(v, dict) for v in metrics.values()):  # evaluate's table stays {checkpoint: {...}}
            metrics = {**metrics, "wall_time_s": round(seconds, 2), "run_id": run_id(cfg)}
        if global_rank() == 0:  # under DDP/FSDP every rank runs the stage; one writes its metrics
            write_json(stage.spec.metrics_file, metrics)
            finish_resume_state(name)
            close_stage_run(chain, stage.spec, cfg, metrics)  # summary, artifacts and lineage
        log.info(summary_line(name, metrics, seconds))
    return metrics


def check_resume_path(cfg: Config, spec: StageSpec) -> None:
    """A training stage given `resume.ckpt_path=<a path>` stops here unless the file loads (as plain data)."""
    if spec.trains:
        cfg.resume.checkpoint_file(spec.name)


def finish_resume_state(name: str) -> None:
    """The stage's outputs are complete: its resume state is marked done, so that a plain rerun trains anew
    instead of resuming the finished run (which `resume.ckpt_path=last` still continues)."""
    state = paths.resume_dir(name) / "state.json"  # its fields: pipeline.training.resume
    if state.is_file():
        write_json(state, {**json.loads(state.read_text()), "done": True})


_interrupted: list[int] = []  # the signal that stopped this process's stage, once one has


def interrupt_exit_code() -> int | None:
    """128 + the signal that stopped the stage (130 for Ctrl-C, 143 for SIGTERM), or None."""
    return 128 + _interrupted[0] if _interrupted else None


def _on_signal(signum: int, _frame) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt where the stage is (Lightning's fit ends its run on it: its
    loggers finalized, its own SIGTERM handler chained before this one); a second signal, while the stage puts
    its previous outputs back, is ignored."""
    if _interrupted:
        return
    _interrupted.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupts() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM stop the stage the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextmanager
def exit_codes(name: str) -> Iterator[None]:
    """A refused config or input: its message logged (on stderr), exit code 2 (no traceback: the message names the fix;
    the stage's log file holds it).
    A NaN/inf loss: exit code 3 (the last good resume checkpoint is kept). SLURM's requeue signal: exit code 75
    (EX_TEMPFAIL; the checkpoint is committed and the job requeued: its rerun resumes). SIGINT or SIGTERM: 130 or
    143 (Lightning turns the KeyboardInterrupt into exit code 1 inside fit; the signal received says which)."""
    try:
        with interrupts():
            yield
    except (ValueError, FileNotFoundError) as err:
        log.error("error in stage %r: %s%s", name, err, _after_exp_run())
        raise SystemExit(2) from None
    except FloatingPointError as err:
        log.error("error in stage %r: %s", name, err)
        raise SystemExit(3) from None
    except (KeyboardInterrupt, SystemExit):
        code = interrupt_exit_code()
        if code is None:
            raise
        log.error("stage %r stopped by %s: its previous outputs are kept; rerun it to resume from its last "
                  "checkpoint (outputs/resume/%s/)", name, signal.Signals(code - 128).name, name)
        raise SystemExit(code) from None
    except Exception as err:
        resume = sys.modules.get("pipeline.training.resume")  # loaded by any stage that trained: no torch import here
        if resume is None or not isinstance(err, resume.Requeued):
            raise
        log.warning("stage %r requeued: %s", name, err)
        raise SystemExit(resume.REQUEUE_EXIT_CODE) from None


def _after_exp_run() -> str:
    """Under `dvc exp run` in the workspace, DVC has already written the experiment's config into params.yaml."""
    root = os.environ.get("DVC_ROOT")
    if not (os.environ.get("DVC_EXP_BASELINE_REV") and root and os.path.samefile(root, ".")):
        return ""
    return ("\n(dvc exp run wrote the experiment's config into params.yaml: rerun it with the fix, or "
            "`git checkout params.yaml` to return to the committed config)")


def main(chain: Chain, name: str) -> None:
    """Entry point of `python -m stages.<name>`: the committed params.yaml is the config."""
    with exit_codes(name):
        run_stage(chain, name, load_params())
