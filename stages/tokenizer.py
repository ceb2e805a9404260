"""Stage `tokenizer`: train the byte-level BPE with chat special tokens on the pretraining text."""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline.checkpoint import TOKENIZER_FILE
from pipeline.context import DATA_DIR
from pipeline.data.prepare import load_split
from pipeline.data.tokenizer import ChatTokenizer, file_sha256, train_bpe
from pipeline.io import atomic_dir
from pipeline.runner import main


def run(cfg: DictConfig) -> dict:
    t = cfg.tokenizer
    texts = [r["text"] for r in load_split(DATA_DIR, "pretrain")]
    tok = train_bpe(texts, int(t.vocab_size), list(t.special_tokens))
    with atomic_dir(TOKENIZER_FILE.parent) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE.name))
    chat = ChatTokenizer.load(TOKENIZER_FILE, list(t.special_tokens))
    val = [r["text"] for r in load_split(DATA_DIR, "pretrain_val")]
    n_tokens = sum(len(ids) for ids in chat.encode_batch(val))
    return {"vocab_size": chat.vocab_size, "chars_per_token": round(sum(map(len, val)) / max(n_tokens, 1), 4),
            "sha256": file_sha256(TOKENIZER_FILE)[:16]}


if __name__ == "__main__":
    main("tokenizer")
