"""Stage `sft`: finetune the pretrained GPT on chat conversations, loss on the assistant's replies only."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Checkpoint, Curve, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="sft",
    desc="The pretrained GPT finetuned on chat conversations, loss on the replies only",
    params=("seed", "sft", "trainer", "strategy", "callbacks", "peft"),
    inputs=(paths.PREPARED, paths.TOKENIZER_DIR),
    reads={"pretrain": "gpt"},
    splits=("sft",),
    writes=(Checkpoint("sft", "gpt", "The pretrained GPT finetuned on chat demonstrations", ("gpt", "chat", "sft")),),
    curves=(Curve("loss", ("train/loss", "val/loss")),),
    trains=True,
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.harness.validation import check_conversation_lengths, check_inputs
    from pipeline.model.lora import check_adapters
    from stages import registry
    inputs = check_inputs(cfg, spec)
    start = spec.checkpoint("gpt")
    check_adapters(cfg.peft, "sft", inputs.metas[start]["model"], registry())
    check_conversation_lengths(inputs.rows["sft"], inputs.tok, inputs.block_size(start))
    from pipeline.training.loggers import check as check_loggers
    check_loggers(cfg, spec.name)  # every logger and callback builds; DVCLive is there under DVC


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.training.lm import finetune
    return finetune(cfg, spec, cfg.sft.max_steps)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
