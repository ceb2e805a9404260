"""Token shards: written from real text with the real BPE and HF `datasets`, read back by memmap."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config.sources import CorpusConfig
from pipeline.data.datamodules import PretrainData, RandomWindows
from pipeline.data.shards import TokenShards, open_corpus, token_dtype, write_tokens
from pipeline.data.tokenizer import ChatTokenizer, train_bpe

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXTS = [f"Doc {i}: Zorbin the {c} fox lives in Kelmar and ate {i * 7} plums." for i, c in
         enumerate(["blue", "red", "grey", "pink"] * 10)] + ["Ünïcödé ✓ and a typed <|end|> stay text.", ""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXTS * 5, 300, SPECIALS).save(str(path))
    return ChatTokenizer.load(path, SPECIALS)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def stream(tok: ChatTokenizer, texts: list[str]) -> list[int]:
    """What pretraining reads: each document opened by <|bos|>."""
    return [i for ids in tok.encode_batch(texts) for i in (tok.bos_id, *ids)]


def shards_from_files(tmp_path: Path, tok: ChatTokenizer, **corpus) -> tuple[Path, dict]:
    files = str(write_jsonl(tmp_path / "docs.jsonl", TEXTS))
    cfg = CorpusConfig(source="files", data_files=files, val_docs=4, **corpus)
    meta = write_tokens(open_corpus(cfg, tmp_path), tok, tmp_path / "tokens", cfg)
    return tmp_path / "tokens", meta


def test_shards_round_trip_to_the_text_with_bos_separators(tmp_path, tok):
    tokens, meta = shards_from_files(tmp_path, tok, shard_tokens=97)
    train, val = TokenShards(tokens, "pretrain"), TokenShards(tokens, "pretrain_val")
    assert val.window(0, len(val)).tolist() == stream(tok, TEXTS[:4])  # held out: the first val_docs documents
    ids = train.window(0, len(train))
    assert ids.tolist() == stream(tok, TEXTS[4:])
    starts = np.flatnonzero(ids == tok.bos_id).tolist() + [len(ids)]
    assert [tok.decode(ids[a + 1:b]) for a, b in itertools.pairwise(starts)] == TEXTS[4:]
    m = meta["pretrain"]
    assert (m["n_docs"], m["n_tokens"], m["dtype"]) == (len(TEXTS) - 4, len(ids), "uint16")
    assert m["n_bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS[4:]) > m["n_chars"]
    assert m["tokenizer_sha256"] == tok.sha256
    assert not list(tmp_path.glob(".tokens*")) and not list(tokens.glob(".*")), "temporary files were left behind"


def test_shards_roll_over_at_shard_tokens_and_windows_cross_them(tmp_path, tok):
    tokens, meta = shards_from_files(tmp_path, tok, shard_tokens=100)
    shards = meta["pretrain"]["shards"]
    assert len(shards) > 3 and [s["file"] for s in shards[:2]] == ["pretrain_000.bin", "pretrain_001.bin"]
    assert all(s["n_tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["n_tokens"] <= 100
    for s in shards:
        assert (tokens / s["file"]).stat().st_size == 2 * s["n_tokens"]
    full = stream(tok, TEXTS[4:])
    train = TokenShards(tokens, "pretrain")
    assert train.window(95, 210).tolist() == full[95:305]
    with pytest.raises(IndexError, match="outside"):
        train.window(len(full) - 3, 4)


def test_ids_are_uint16_when_the_vocabulary_fits_else_uint32(tmp_path, tok):
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32

    class Huge(ChatTokenizer):  # a 100k vocabulary without training one
        vocab_size = 100_000

    huge = Huge(tok.tok, SPECIALS, tok.sha256)
    tokens, meta = shards_from_files(tmp_path, huge)
    assert meta["pretrain"]["dtype"] == "uint32"
    shard = meta["pretrain"]["shards"][0]
    assert (tokens / shard["file"]).stat().st_size == 4 * shard["n_tokens"]
    assert TokenShards(tokens, "pretrain").window(0, 50).tolist() == stream(tok, TEXTS[4:])[:50]


def test_a_streamed_file_gives_the_same_tokens_as_a_loaded_one(tmp_path, tok):
    import datasets

    write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    out = {}
    for streaming in (False, True):
        cfg = CorpusConfig(source="files", data_files=str(tmp_path / "docs.jsonl"), streaming=streaming, val_docs=4,
                           max_docs=30, batch_docs=7)
        splits = open_corpus(cfg, tmp_path)
        assert isinstance(splits["pretrain"], datasets.IterableDataset) == streaming
        write_tokens(splits, tok, tmp_path / f"tokens{streaming}", cfg)
        out[streaming] = [TokenShards(tmp_path / f"tokens{streaming}", s).window(0, 40).tolist()
                          for s in ("pretrain", "pretrain_val")]
        assert TokenShards(tmp_path / f"tokens{streaming}", "pretrain").meta["n_docs"] == 30
    assert out[True] == out[False]


def test_the_generated_source_reads_what_prepare_wrote(tmp_path, tok):
    write_jsonl(tmp_path / "pretrain.jsonl", TEXTS[:30])
    write_jsonl(tmp_path / "pretrain_val.jsonl", TEXTS[30:])
    cfg = CorpusConfig()
    meta = write_tokens(open_corpus(cfg, tmp_path), tok, tmp_path / "tokens", cfg)
    assert meta["pretrain"]["n_tokens"] == len(stream(tok, TEXTS[:30]))
    assert TokenShards(tmp_path / "tokens", "pretrain_val").window(0, 20).tolist() == stream(tok, TEXTS[30:])[:20]


@pytest.mark.parametrize("corpus, match", [
    ({"source": "web"}, "data.corpus.source 'web' is unknown"),
    ({"source": "hub"}, "data.corpus.path is required"),
    ({"source": "files"}, "data.corpus.data_files is required"),
    ({"shard_tokens": 0}, "data.corpus.shard_tokens"),
    ({"streaming": True, "num_proc": 2}, "data.corpus.num_proc needs streaming: false"),
    ({"text_feild": "body"},
     r"data\.corpus\.text_feild is not a setting of data\.corpus: did you mean data\.corpus\.text_field\?"),
])
def test_a_bad_corpus_config_names_the_field(corpus, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig.parse(corpus)


def test_a_missing_text_field_or_file_is_named_with_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", TEXTS, field="body")
    for streaming in (False, True):
        cfg = CorpusConfig(source="files", data_files=str(path), streaming=streaming)
        with pytest.raises(ValueError, match=r"text_field 'text' is not a column of .*docs.jsonl.*\['body', 'id'\]"):
            open_corpus(cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        open_corpus(CorpusConfig(source="files", data_files=str(tmp_path / "nope.jsonl")), tmp_path)
    with pytest.raises(ValueError, match=r"\.csv"):
        open_corpus(CorpusConfig(source="files", data_files=str(tmp_path / "docs.csv")), tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare stage"):
        open_corpus(CorpusConfig(), tmp_path)


def global_batches(tokens: TokenShards, batch: int, world: int, steps: int, workers: int = 0) -> list[torch.Tensor]:
    """Each step's batches of every rank, concatenated in rank order."""
    loaders = [iter(DataLoader(RandomWindows(tokens, 8, batch, seed=3, rank=r, world_size=world), batch_size=batch,
                               num_workers=workers)) for r in range(world)]
    return [torch.cat([next(it)["input_ids"] for it in loaders]) for _ in range(steps)]


def test_the_global_batch_does_not_depend_on_ranks_or_workers(tmp_path, tok):
    tokens = TokenShards(shards_from_files(tmp_path, tok, shard_tokens=100)[0], "pretrain")
    one = global_batches(tokens, 8, 1, 5)
    assert all(b.shape == (8, 8) for b in one) and not torch.equal(one[0], one[1])
    for other in (global_batches(tokens, 4, 2, 5), global_batches(tokens, 2, 4, 5),
                  global_batches(tokens, 8, 1, 5, workers=2)):
        assert all(torch.equal(a, b) for a, b in zip(one, other))
    item = next(iter(RandomWindows(tokens, 8, 1, seed=3)))
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])


def test_pretrain_data_reads_shards_and_reports_tokens_per_byte(tmp_path, tok):
    tokens, _ = shards_from_files(tmp_path, tok, shard_tokens=100)
    data = PretrainData(tok, block_size=16, batch_size=4, seed=0, tokens_dir=tokens)
    data.setup()
    val_ids, val_bytes = stream(tok, TEXTS[:4]), sum(len(t.encode("utf-8")) for t in TEXTS[:4])
    assert data.val_tokens_per_byte == pytest.approx(len(val_ids) / val_bytes)
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"][1].tolist() == val_ids[16:32] and batch["labels"][0].tolist() == val_ids[1:17]
    assert next(iter(data.train_dataloader()))["input_ids"].shape == (4, 16)
    with pytest.raises(ValueError, match="fewer than model.block_size"):
        PretrainData(tok, block_size=len(val_ids), batch_size=4, seed=0, tokens_dir=tokens).setup()
    other = ChatTokenizer(tok.tok, SPECIALS, "f" * 64)
    with pytest.raises(ValueError, match="another tokenizer"):
        PretrainData(other, block_size=16, batch_size=4, seed=0, tokens_dir=tokens).setup()
    with pytest.raises(FileNotFoundError, match="tokenizer stage"):
        PretrainData(tok, block_size=16, batch_size=4, seed=0, tokens_dir=tmp_path / "none").setup()


def test_holding_out_every_document_is_refused(tmp_path):
    cfg = CorpusConfig(source="files", data_files=str(write_jsonl(tmp_path / "docs.jsonl", TEXTS)), val_docs=len(TEXTS))
    with pytest.raises(ValueError, match="no training documents.*data.corpus.val_docs"):
        open_corpus(cfg, tmp_path)


def test_a_hub_corpus_offline_fails_fast_and_says_how_to_go_online(tmp_path):
    # conftest sets HF_DATASETS_OFFLINE=1, as the runner does: no network call, no hang
    with pytest.raises(ValueError, match="HF_DATASETS_OFFLINE=0"):
        open_corpus(CorpusConfig(source="hub", path="HuggingFaceFW/fineweb-edu", streaming=True), tmp_path)
