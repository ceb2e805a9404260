"""Stage `tokenizer`: train the byte-level BPE with the chat special tokens on the pretraining text, then
tokenize that text into the flat shards (`data/tokens`) pretraining memory-maps. With
`model.init_from=hf:DIR` the tokenizer is DIR's instead (plus any special tokens it lacks)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Artifact, Out, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="tokenizer",
    desc="The byte-level BPE with the chat special tokens, and the pretraining text as token shards",
    params=("tokenizer", "data.corpus", "model.init_from"),
    inputs=(paths.PREPARED,),
    outs=(Out(str(paths.TOKENIZER_DIR)), Out(str(paths.TOKENS))),
    artifacts=(Artifact("tokens", str(paths.TOKENS), "dataset", "The pretraining text tokenized into flat "
                        "uint16/uint32 shards that pretraining memory-maps", ("data", "tokens")),
               Artifact("tokenizer", str(paths.TOKENIZER_DIR), "model",
                        "Byte-level BPE tokenizer with the chat special tokens (tokenizer.json)",
                        ("tokenizer", "bpe"))),
)


def check(cfg: Config, spec: StageSpec) -> None:
    cfg.model.init_dir()  # a checkpoint to take the tokenizer from must be there


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.data.tokens import build
    return build(cfg.tokenizer, cfg.data, cfg.model.init_dir())


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
