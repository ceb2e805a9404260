"""Stage `report`: reports/report.md, its figures (reports/figures/) and reports/accuracy.json, from every earlier
stage's metrics and training curves."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Artifact, Out, Plot, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="report",
    desc="The lifecycle report from every stage's metrics and curves",
    params=("model", "trainer", "strategy", "align.method"),  # its header names them
    reads_metrics=True,
    outs=(Out(str(paths.REPORTS / "report.md"), cache=False),),
    plots=(
        # exact match per checkpoint x prompting mode x split: one bar per row, offset per experiment
        Plot(str(paths.REPORTS / "accuracy.json"), x="exact_match", y="label", template="bar_horizontal"),
        # the report's PNGs (training curves, accuracy bars, alignment reward and KL) as image plots
        Plot(str(paths.REPORTS / "figures")),
    ),
    artifacts=(Artifact("report", str(paths.REPORTS), "report",
                        "The lifecycle report: report.md, its figures and accuracy.json", in_dvc=False),),
)


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.evaluation.report import write_report
    order = [p.stem for p in spec.inputs if p.parent == paths.METRICS]  # every earlier stage, in chain order
    return write_report(cfg, paths.METRICS, paths.REPORTS, order, order)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
