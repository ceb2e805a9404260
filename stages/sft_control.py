"""Stage `sft_control`: the SFT checkpoint trained further, for as many optimizer steps as `align` gave the
weights it saved (the aligned checkpoint's meta: `policy_updates`, fewer than planned under `align.keep=best` or
early stopping), on the SFT data and batch size. `evaluate` scores it beside `aligned`: if alignment beats SFT
but not this control, more training, not alignment, moved the number."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Checkpoint, Curve, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

ALIGNED = "aligned"  # align's checkpoint: its meta's policy_updates are the steps to match


def _reads(cfg: Config | None) -> dict[str, str]:
    return {ALIGNED: "gpt"}


SPEC = StageSpec(
    name="sft_control",
    desc="The same-compute control: SFT trained as many more steps as alignment gave the policy",
    params=("seed", "sft", "align", "trainer", "strategy", "callbacks", "peft"),
    inputs=(paths.PREPARED, paths.TOKENIZER_DIR),
    reads={"sft": "gpt"},
    reads_for=_reads,
    splits=("sft",),
    writes=(Checkpoint("sft_control", "gpt", "The SFT model trained further for as many steps as alignment took, "
                       "the control", ("gpt", "chat", "sft", "control")),),
    curves=(Curve("loss", ("train/loss", "val/loss")),),
    trains=True,
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.alignment import methods
    from pipeline.harness.validation import check_conversation_lengths, check_inputs
    from pipeline.model.lora import check_adapters
    from stages import registry
    methods.load(cfg)  # align's config checks, as align's own
    inputs = check_inputs(cfg, spec)
    start = spec.checkpoint("gpt")
    check_adapters(cfg.peft, "sft", inputs.metas[start]["model"], registry())  # it trains as SFT did
    check_conversation_lengths(inputs.rows["sft"], inputs.tok, inputs.block_size(start))
    from pipeline.training.loggers import check as check_loggers
    check_loggers(cfg, spec.name)  # every logger and callback builds; DVCLive is there under DVC


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.model.handoff import read_meta
    from pipeline.training.lm import finetune_further
    aligned = read_meta(ALIGNED, spec.producers.get(ALIGNED))
    # the updates behind the weights align saved: fewer than planned under keep=best or early stopping
    return finetune_further(cfg, spec, steps=int(aligned["policy_updates"]), matches=str(aligned["method"]))


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
