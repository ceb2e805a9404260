"""The tokenizer stage: the BPE (trained on the pretraining text, or a transformers checkpoint's own, with its chat
template when it has one), then that text tokenized into the flat shards pretraining memory-maps
(`pipeline.data.shards`)."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import paths
from pipeline.config.data import DataConfig, TokenizerConfig
from pipeline.data.shards import head_texts, open_corpus, write_tokens
from pipeline.data.tokenizer import import_chat_template, import_tokenizer, load_tokenizer, train_bpe
from pipeline.io import atomic_dir


def build(tokenizer: TokenizerConfig, data: DataConfig, init_dir: Path | None) -> dict:
    """Write artifacts/tokenizer and data/tokens; return the stage's metrics.

    `init_dir` (model.init_from): take that checkpoint's tokenizer, whose ids its weights know, instead
    of training one, and its chat template (written beside tokenizer.json) when it has one."""
    corpus = data.corpus
    splits = open_corpus(corpus, paths.PREPARED)
    template = None
    if init_dir is not None:
        bpe = import_tokenizer(init_dir, tokenizer.special_tokens)
        template = import_chat_template(init_dir, bpe)
    else:
        bpe = train_bpe(head_texts(splits["pretrain"], corpus.text_field, tokenizer.train_docs), tokenizer.vocab_size,
                        tokenizer.special_tokens)
    with atomic_dir(paths.TOKENIZER_DIR) as tmp:
        bpe.save(str(tmp / paths.TOKENIZER_FILE.name))
        if template is not None:
            template.save(tmp)
    tok = load_tokenizer(tokenizer.special_tokens)
    start = time.perf_counter()
    meta = write_tokens(splits, tok, paths.TOKENS, corpus)
    seconds = time.perf_counter() - start
    val = meta["pretrain_val"]
    return {"vocab_size": tok.vocab_size,
            "chars_per_token": round(val["n_chars"] / max(val["n_tokens"] - val["n_docs"], 1), 4),  # <|bos|> aside
            "sha256": tok.sha256[:16],  # the pipeline's template: tokenizer.json's; an adopted one: with the template
            "tokens_per_sec": round(sum(m["n_tokens"] for m in meta.values()) / seconds, 1),
            **{f"n_tokens_{split}": m["n_tokens"] for split, m in meta.items()},
            "val_tokens_per_byte": round(val["n_tokens"] / max(val["n_bytes"], 1), 4)}
