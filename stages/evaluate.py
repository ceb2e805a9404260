"""Stage `evaluate`: every language-model checkpoint on the same eval prompts, and the verdict on alignment
(pipeline/evaluation/evaluate.py) -> metrics/evaluate.json {checkpoint: {metric: value}, verdict: {...}}."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Artifact, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="evaluate",
    desc="Every language-model checkpoint on the same eval prompts, and the verdict on alignment",
    params=("seed", "evaluate", "trainer"),  # trainer: the device and precision it scores in
    inputs=(paths.PREPARED, paths.TOKENIZER_DIR),
    reads_every="gpt",
    reads={"reward": "reward"},
    splits=("eval", "eval_hard", "sft"),
    artifacts=(Artifact("evaluation", str(paths.metrics_file("evaluate")), "evaluation",
                        "Every checkpoint scored on the same eval prompts (metrics/evaluate.json)", in_dvc=False),),
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.evaluation.evaluate import REFERENCE, check_prompts
    from pipeline.harness.validation import check_inputs
    from pipeline.inference.placement import check_placement
    check_placement(cfg.trainer)  # an accelerator this machine lacks stops the stage before it loads anything
    inputs = check_inputs(cfg, spec)
    check_prompts(cfg.evaluate, inputs.tok, inputs.block_size(REFERENCE),
                  {split: inputs.rows[split] for split in ("eval", "eval_hard")})


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.evaluation.evaluate import evaluate
    return evaluate(cfg, spec)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
