"""Logging for a stage run: a concise console, a DEBUG file per run, rank-zero aware; progress that fits its output.

Every way of starting a stage ends in pipeline.harness.runner.run_stage, which runs the stage inside
`stage_logging(name)`:
- the console (stderr) shows the pipeline's own INFO lines (loggers `pipeline.*`, `stages.*`) and every
  library's warnings and errors; Lightning's and others' INFO lines ("GPU available: ...") go to the file only.
  Under DDP/FSDP only global rank 0 logs INFO there; the other ranks show warnings and errors, marked with
  their rank (pipeline.dist.global_rank, read per record: no Lightning import).
- the file `outputs/logs/<stage>/<YYYYmmdd-HHMMSS>.log` (`-rank<N>` before `.log` on other ranks) gets DEBUG
  and up from every logger, Lightning's included, and Python warnings (`logging.captureWarnings`), with time,
  level and logger name, and the traceback of a failed stage. outputs/ is neither in git nor a DVC output or
  dependency, so the logs never change what DVC sees.
Hydra's own job log stays off (conf/config.yaml): this file covers `python -m pipeline` (Hydra) and
`python -m stages.<name>` (dvc repro, no Hydra app) alike.

Two known messages are dropped at their source with a comment why (`quiet_known_noise`); others are fixed where
they start. `progress` is a rich bar on a terminal and a few log lines elsewhere (CI, `dvc repro | tee`), so a
piped run gets neither redraws nor runs of blank lines.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline import paths
from pipeline.dist import global_rank

T = TypeVar("T")
OWN = ("pipeline", "stages")  # loggers whose INFO lines reach the console
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# libraries that log every lock, request or font lookup at DEBUG: INFO and up from them is plenty in the file
CHATTY = ("filelock", "fsspec", "urllib3", "matplotlib", "PIL", "asyncio", "git", "httpcore", "httpx")
# an advert Lightning logs at INFO on every Trainer without its LitLogger (logger_connector.py): not a diagnostic
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
_CONSOLE = "pipeline.logs.console"  # the name our console handler carries, so configuring twice adds it once

log = logging.getLogger(__name__)


class RankZero(logging.Filter):
    """INFO and below from global rank 0 only; warnings and errors from every rank, marked with theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_prefix = f"[rank {rank}] " if rank else ""
        return rank == 0 or record.levelno >= logging.WARNING


class ConsoleFilter(logging.Filter):
    """The pipeline's INFO lines and everyone's warnings; no adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.partition(".")[0] not in OWN:
            return False
        return not is_noise(record)


def is_noise(record: logging.LogRecord) -> bool:
    return record.name.startswith("lightning") and str(record.msg).startswith(LITLOGGER_TIP)


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO; "warning: " before a warning (an error's message says what it is)."""

    def format(self, record: logging.LogRecord) -> str:
        text = getattr(record, "rank_prefix", "") + super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (rich's live display and pytest's capture swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install_console() -> logging.Handler:
    """The console handler on the root logger, once per process; Lightning's own stderr handler taken off
    (it adds one when imported before the root logger has a handler) so its lines follow the same rules."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.get_name() == _CONSOLE:
            return handler
    handler = StderrHandler()
    handler.set_name(_CONSOLE)
    handler.setLevel(logging.INFO)
    handler.addFilter(RankZero())
    handler.addFilter(ConsoleFilter())
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    root.addHandler(handler)
    adopt_lightning()
    return handler


def adopt_lightning() -> None:
    """Take Lightning's own stderr handlers off (`lightning` adds one on import, "INFO: ..."; `lightning.pytorch`
    and `lightning.fabric` one each when imported before the root logger has a handler), so that its lines reach
    the root's handlers like everyone's: INFO to the file, warnings to the console too. Called where the pipeline
    first uses Lightning (an Objective, Fabric's launch), after the import: it needs no import of its own."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning = logging.getLogger(name)
        for own in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(own)
        lightning.propagate = True


def log_file(stage: str, rank: int | None = None, now: float | None = None) -> Path:
    """`outputs/logs/<stage>/<YYYYmmdd-HHMMSS>.log`, `-rank<N>` before `.log` on global rank N > 0."""
    rank = global_rank() if rank is None else rank
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return paths.OUTPUTS / "logs" / stage / (f"{stamp}-rank{rank}.log" if rank else f"{stamp}.log")


def quiet_known_noise() -> None:
    """Warnings with no fix on this side, dropped by message and module (each says why)."""
    # Lightning 2.6's CombinedLoader flattens every dataloader with torch's `LeafSpec()`, deprecated in torch 2.10
    # (Lightning-AI/pytorch-lightning#21326, silenced only in Lightning's own doctests): nothing here calls it
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


@contextmanager
def stage_logging(stage: str) -> Iterator[Path]:
    """Console and this run's log file (yielded) for the stage's duration; the file is closed after it."""
    install_console()
    quiet_known_noise()
    # off, then on: captureWarnings(True) does nothing once on, even where warnings.showwarning was put back since
    # (warnings.catch_warnings does, e.g. pytest's around each test), so a second stage in one process lost them
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    path = log_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(lambda record: not is_noise(record))
    root = logging.getLogger()
    old_level = root.level
    chatty = {name: logging.getLogger(name).level for name in CHATTY}
    root.setLevel(logging.DEBUG)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(handler)
    log.debug("stage %s, global rank %d, argv %s", stage, global_rank(), sys.argv)
    try:
        yield path
    except BaseException:
        log.debug("stage %s failed", stage, exc_info=True)  # the traceback in the file; the console gets the message
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for name, level in chatty.items():
            logging.getLogger(name).setLevel(level)


# the metrics a stage's summary line shows, in this order, where the stage has them
HEADLINE = ("val_loss", "val_bpb", "accuracy", "margin", "objective/scores", "objective/kl", "rewards/margins",
            "exact_match", "kl_to_sft", "tokens_per_sec", "mfu")


def summary_line(stage: str, metrics: Mapping, seconds: float) -> str:
    """"stage pretrain done in 83.2 s: val_loss 0.85, val_bpb 0.555, tokens_per_sec 1.95e+04" (a few key metrics;
    evaluate's are the aligned checkpoint's and its verdict)."""
    if isinstance(metrics.get("verdict"), Mapping):
        shown = {f"aligned {k}": metrics.get("aligned", {}).get(k) for k in ("exact_match", "kl_to_sft")}
        shown.update({k: metrics["verdict"].get(k) for k in ("beats_sft", "beats_control")})
    else:
        shown = {k: metrics.get(k) for k in HEADLINE}
    parts = [f"{k} {v:.4g}" for k, v in shown.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"stage {stage} done in {seconds:.1f} s" + (": " + ", ".join(parts) if parts else "")


def interactive() -> bool:
    """Whether progress can redraw in place: rich's view of stdout (a terminal, or FORCE_COLOR set)."""
    from rich import get_console
    return get_console().is_terminal


def progress(items: Iterable[T], description: str, total: int | None = None, transient: bool = False,
             logger: logging.Logger = log) -> Iterator[T]:
    """`items`, with a rich bar on a terminal; elsewhere a log line at each quarter done (INFO). Only global rank 0
    shows progress: every rank drawing its own bar on one terminal garbles them all."""
    total = len(items) if total is None and hasattr(items, "__len__") else total
    if global_rank() != 0:
        yield from items
        return
    if interactive():
        from rich.progress import track
        yield from track(items, description=description, total=total, transient=transient)
        return
    start, next_quarter = time.perf_counter(), 1
    for done, item in enumerate(items, 1):
        yield item
        if total and done * 4 >= next_quarter * total:
            logger.info("%s: %d/%d (%.0f s)", description, done, total, time.perf_counter() - start)
            next_quarter = done * 4 // total + 1
