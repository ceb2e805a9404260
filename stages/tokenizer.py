"""Stage `tokenizer`: train the byte-level BPE with the chat special tokens on the pretraining text, then
tokenize that text into the flat shards (`data/tokens`) pretraining memory-maps. With
`model.init_from=hf:DIR` the tokenizer is DIR's instead: with DIR's own chat template when it has one
(artifacts/tokenizer/chat_template.jinja and chat_tokens.json), else plus any special tokens it lacks."""
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
    from pipeline.data.shards import SPLITS
    from pipeline.data.splits import load_split
    from pipeline.input_files import check_links
    init_dir = cfg.model.init_dir()  # a checkpoint to take the tokenizer from must be there
    if init_dir is not None:  # with a chat template whose replies can be found, if it has one
        from pipeline.data.tokenizer import import_chat_template, import_tokenizer
        from pipeline.interop.hf import check_pretrained
        tok = import_tokenizer(init_dir, cfg.tokenizer.special_tokens)
        import_chat_template(init_dir, tok)
        check_pretrained(cfg.model, tok.get_vocab_size())  # an architecture pretrain could not import: refused now
    check_links(spec.inputs)
    if cfg.data.corpus.source == "generated":  # read by `datasets`, which reads the rows load_split checks
        for split in SPLITS:
            load_split(paths.PREPARED, split)


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.data.tokens import build
    return build(cfg.tokenizer, cfg.data, cfg.model.init_dir())


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
