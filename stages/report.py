"""Stage `report`: reports/report.md, its figures (reports/figures/) and reports/accuracy.json from every
stage's metrics and training curves."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.evaluation.report import write_report
from pipeline.runner import METRICS_DIR, main

REPORTS_DIR = Path("reports")


def run(cfg: DictConfig) -> dict:
    return write_report(cfg, METRICS_DIR, REPORTS_DIR)


if __name__ == "__main__":
    main("report")
