"""Hydra multirun support: each job works in its own directory, and the sweep ends with one table.

A job of `python -m pipeline -m stage=pretrain optim.lr=1e-3,3e-3` must not overwrite the
workspace's DVC-tracked outputs, nor another job's. So each job runs inside its Hydra output
directory (`multirun/<date>/<n>/`), where the workspace's upstream outputs (`data/*`,
`artifacts/*`) appear as symlinks: the job reads them, and what it writes replaces the link, never
the workspace's file (see `pipeline.io.atomic_dir`). Metrics, curves, checkpoints and the W&B
run of the job all land in its directory.

`SweepSummary` (a Hydra callback, registered in conf/config.yaml) gathers every job's overrides
and metrics into `<sweep dir>/summary.json` and a Markdown table `summary.md`, and prints it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.io import flatten

LINKED = ("data", "artifacts")   # workspace directories whose entries a job sees through symlinks
# a whole-chain sweep's table: each stage's validation loss and accuracy, each checkpoint's exact match
HEADLINE = ("val_loss", "accuracy", "exact_match")


@contextmanager
def job_directory(job_dir: Path, workspace: Path) -> Iterator[Path]:
    """Run the block inside `job_dir`, with the data/ and artifacts/ entries of `workspace` (the
    directory the sweep was launched from) linked in."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for top in LINKED:
        for entry in sorted((workspace / top).glob("*")) if (workspace / top).is_dir() else []:
            if entry.name.startswith("."):
                continue
            link = job_dir / top / entry.name
            if not link.exists() and not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    old = Path.cwd()
    os.chdir(job_dir)
    try:
        yield job_dir
    finally:
        os.chdir(old)


def job_rows(sweep_dir: Path) -> list[dict]:
    """One row per finished job: its number, overrides, and every metric as `<stage>.<key>`."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics = {}
        for f in sorted((job / "metrics").glob("*.json")):
            metrics.update(flatten(json.loads(f.read_text()), prefix=f"{f.stem}."))
        rows.append({"job": int(job.name), "overrides": overrides, "metrics": metrics})
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    head = ["job", "overrides", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:  # the overrides every job shares are not repeated on each row
        swept = [o for o in r["overrides"] if o not in shared]
        lines.append("| " + " | ".join([str(r["job"]), " ".join(swept),
                                        *(cell(r["metrics"].get(c)) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """At the end of a multirun: `summary.json` (everything) and `summary.md` (chosen columns; by
    default the swept stage's metrics that differ between jobs)."""

    def __init__(self, columns: list[str] | None = None) -> None:
        self.columns = list(columns) if columns else None

    def default_columns(self, stage: str, rows: list[dict]) -> list[str]:
        keys = {k for r in rows for k, v in r["metrics"].items()
                if (k.rpartition(".")[2] in HEADLINE if stage == "all" else k.startswith(f"{stage}."))
                and isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("wall_time_s")}
        varying = {k for k in keys if len({r["metrics"].get(k) for r in rows}) > 1}
        return sorted(varying if len(rows) > 1 and varying else keys)  # constants would only widen the table

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = job_rows(sweep_dir)
        columns = self.columns or self.default_columns(str(config.get("stage")), rows)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        table = markdown_table(rows, columns)
        (sweep_dir / "summary.md").write_text(table)
        print(f"\nsweep of {len(rows)} jobs: {sweep_dir}/summary.md\n{table}")
