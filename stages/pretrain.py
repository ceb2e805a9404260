"""Stage `pretrain`: a GPT from scratch (or from `model.init_from=hf:DIR`) on the pretraining text, next-token loss."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Checkpoint, Curve, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="pretrain",
    desc="A GPT from scratch (or model.init_from) on the pretraining text, next-token loss",
    params=("seed", "model", "pretrain", "trainer", "strategy", "callbacks"),
    inputs=(paths.TOKENS, paths.TOKENIZER_DIR),
    writes=(Checkpoint("pretrain", "gpt", "GPT pretrained on next-token prediction (model.safetensors, meta.json)",
                       ("gpt", "base")),),
    curves=(Curve("loss", ("train/loss", "val/loss")),),
    trains=True,
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.data.shards import check_token_shards
    from pipeline.harness.validation import check_inputs
    tok = check_inputs(cfg, spec).tok
    check_token_shards(paths.TOKENS, tok)
    source = cfg.model.init_dir()
    if source is not None:  # config.json, the weights' headers and the tokenizer, before any work
        from pipeline.interop.hf import check_imported_tokenizer, check_pretrained
        check_pretrained(cfg.model, tok.vocab_size)
        check_imported_tokenizer(source, tok.tok, cfg.tokenizer.special_tokens)
    from pipeline.training.loggers import check as check_loggers
    check_loggers(cfg, spec.name)  # every logger and callback builds; DVCLive is there under DVC


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.training.lm import pretrain
    return pretrain(cfg, spec)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
