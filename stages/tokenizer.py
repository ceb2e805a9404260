"""Stage `tokenizer`: train the byte-level BPE with chat special tokens on the pretraining text, then
tokenize that text into flat shards (`data/tokens`) that pretraining memory-maps. With
`model.init_from=hf:DIR` the tokenizer is DIR's instead (plus any special tokens it lacks, pipeline/hf.py)."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from pipeline.checkpoint import TOKENIZER_FILE
from pipeline.context import DATA_DIR
from pipeline.data.shards import TOKENS_DIR, TRAIN_DOCS, CorpusConfig, head_texts, open_corpus, write_tokens
from pipeline.data.tokenizer import ChatTokenizer, train_bpe
from pipeline.io import file_sha256
from pipeline.hf import import_tokenizer, init_source
from pipeline.io import atomic_dir
from pipeline.runner import main


def run(cfg: DictConfig) -> dict:
    t = cfg.tokenizer
    corpus = CorpusConfig.from_cfg(cfg.data.get("corpus"))
    train_docs = t.get("train_docs") or TRAIN_DOCS
    if isinstance(train_docs, bool) or not isinstance(train_docs, int) or train_docs < 1:
        raise ValueError(f"tokenizer.train_docs ({train_docs!r}) must be a positive integer, e.g. {TRAIN_DOCS}")
    source = init_source(cfg.model.get("init_from"))
    splits = open_corpus(corpus, DATA_DIR)
    if source is not None:  # the imported model's own tokenizer: its ids are what the weights know
        bpe = import_tokenizer(source, list(t.special_tokens))
    else:
        bpe = train_bpe(head_texts(splits["pretrain"], corpus.text_field, train_docs), int(t.vocab_size),
                        list(t.special_tokens))
    with atomic_dir(TOKENIZER_FILE.parent) as tmp:
        bpe.save(str(tmp / TOKENIZER_FILE.name))
    tok = ChatTokenizer.load(TOKENIZER_FILE, list(t.special_tokens))
    start = time.perf_counter()
    meta = write_tokens(splits, tok, TOKENS_DIR, corpus)
    seconds = time.perf_counter() - start
    val = meta["pretrain_val"]
    return {"vocab_size": tok.vocab_size,
            "chars_per_token": round(val["n_chars"] / max(val["n_tokens"] - val["n_docs"], 1), 4),  # <|bos|> aside
            "sha256": file_sha256(TOKENIZER_FILE)[:16],
            "tokens_per_sec": round(sum(m["n_tokens"] for m in meta.values()) / seconds, 1),
            **{f"n_tokens_{split}": m["n_tokens"] for split, m in meta.items()},
            "val_tokens_per_byte": round(val["n_tokens"] / max(val["n_bytes"], 1), 4)}


if __name__ == "__main__":
    main("tokenizer")
