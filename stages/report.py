"""Stage `report`: reports/report.md from every stage's metrics."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from pipeline.evaluation.report import render
from pipeline.runner import METRICS_DIR, main

REPORT = Path("reports/report.md")


def run(cfg: DictConfig) -> dict:
    text = render(cfg, METRICS_DIR)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, REPORT)
    return {"report_lines": text.count("\n") + 1}


if __name__ == "__main__":
    main("report")
