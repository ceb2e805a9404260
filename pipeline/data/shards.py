"""Pretraining text → flat token shards on disk (`data/tokens`), and the memmap reader over them.

Holds `open_corpus` (the `pretrain` and `pretrain_val` document streams `data.corpus`, the validated
`pipeline.config.sources.CorpusConfig`, names), `write_tokens` (tokenize them into shards, atomically),
`TokenShards` (read one split back as one flat stream) and `check_token_shards` (refuse, before pretraining, an
index that is damaged or another split's, a shard of another size than it says, an id outside the vocabulary).

Design choices:
- One flat stream per split with every document opened by <|bos|>, as nanoGPT's `.bin` files:
  training draws windows anywhere in it, so documents need no padding and no index. (The token is the
  tokenizer's `bos_id`: an adopted checkpoint's bos, or without one its document separator.)
- ids are stored raw as uint16 whenever the vocabulary fits (half the disk and page cache of
  uint32); a `<split>.json` beside the shards says the dtype, the counts and the tokenizer hash.
- Tokenization is HF `datasets` `.map(batched=True)`: over an Arrow dataset it can fan out to
  `num_proc` processes and spills to disk; over a streaming one it runs lazily. Either way each
  batch is appended to the open shard file, so the heap stays flat however large the corpus is
  (an Arrow dataset's memory map still shows up in RSS as reclaimable page cache; a stream avoids it).
- Shards roll over at `shard_tokens` tokens so no file grows without bound.
- The text comes from the `prepare` stage (`generated`), the Hub (`hub`) or local files
  (`files`); the config is checked, and the text field looked up in the data, before any work.
"""
from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config.sources import CORPUS_FILES, CorpusConfig, file_builder
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.input_files import json_type, read_json, require_file
from pipeline.io import atomic_dir
from pipeline.logs import interactive

SPLITS = ("pretrain", "pretrain_val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (GPT-2's 50257 does), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ------------------------------------------------------------------ reading the text

def _load(cfg: CorpusConfig, split: str, prepared: Path) -> tuple[Any, str]:
    """One split as a datasets (Iterable)Dataset, and a name for it in messages."""
    import datasets

    if cfg.source == "generated":
        path = prepared / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
        return datasets.load_dataset("json", data_files=str(path), split="train", streaming=cfg.streaming), str(path)
    if cfg.source == "files":
        builder = file_builder(cfg.data_files, "data.corpus", CORPUS_FILES)
        data_files = cfg.data_files if isinstance(cfg.data_files, (str, dict)) else list(cfg.data_files)
        return (datasets.load_dataset(builder, data_files=data_files, split=split, streaming=cfg.streaming),
                f"{cfg.data_files} (split {split})")
    where = f"hub dataset {cfg.path}" + (f"/{cfg.name}" if cfg.name else "") + f" (split {split})"
    try:
        return datasets.load_dataset(cfg.path, cfg.name, data_files=cfg.data_files, split=split,
                                     streaming=cfg.streaming), where
    except ConnectionError as err:
        raise ValueError(f"could not reach {where}: {err}. Hub data needs network: set HF_DATASETS_OFFLINE=0 "
                         "and HF_HUB_OFFLINE=0 (the pipeline is offline by default)") from None


def _columns(ds: Any) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds.take(1)), None)  # a stream without declared features: look at one row
    return list(first) if first is not None else []


def _head(ds: Any, n: int) -> Any:
    return ds.take(min(n, len(ds))) if hasattr(ds, "__len__") else ds.take(n)


def _tail(ds: Any, n: int) -> Any:
    if not hasattr(ds, "__len__"):
        return ds.skip(n)
    return ds.select(range(n, len(ds)) if n < len(ds) else [])


def open_corpus(cfg: CorpusConfig, prepared: Path) -> dict[str, Any]:
    """{"pretrain": docs, "pretrain_val": docs}: datasets with a `text_field` column, not yet tokenized."""
    if cfg.source == "generated":
        out = {split: _load(cfg, split, prepared) for split in SPLITS}
    elif cfg.val_split:
        out = {"pretrain": _load(cfg, cfg.split, prepared), "pretrain_val": _load(cfg, cfg.val_split, prepared)}
    else:  # hold out the first val_docs documents
        docs, where = _load(cfg, cfg.split, prepared)
        out = {"pretrain": (_tail(docs, cfg.val_docs), where),
               "pretrain_val": (_head(docs, cfg.val_docs), f"{where}, first {cfg.val_docs} documents")}
    for docs, where in out.values():
        columns = _columns(docs)
        if cfg.text_field not in columns:
            raise ValueError(f"data.corpus.text_field {cfg.text_field!r} is not a column of {where} "
                             f"(columns: {columns}): set data.corpus.text_field to the one holding the text")
    if hasattr(out["pretrain"][0], "__len__") and len(out["pretrain"][0]) == 0:
        raise ValueError(f"{out['pretrain'][1]} has no training documents: add data or lower data.corpus.val_docs")
    if cfg.max_docs is not None:
        out["pretrain"] = (_head(out["pretrain"][0], cfg.max_docs), out["pretrain"][1])
    return {split: docs for split, (docs, _) in out.items()}


def head_texts(docs: Any, text_field: str, limit: int, batch_docs: int = 1000) -> Iterator[str]:
    """The first `limit` texts of `docs`, read a batch at a time (for training the BPE)."""
    for batch in _head(docs, limit).select_columns([text_field]).iter(batch_size=batch_docs):
        yield from (t or "" for t in batch[text_field])


# ------------------------------------------------------------------ writing shards

class _Encode:
    """The `.map` function: <|bos|> + ids per document, and its size in UTF-8 bytes and characters."""

    def __init__(self, tok: ChatTokenizer, text_field: str) -> None:
        self.tok, self.text_field = tok, text_field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[self.text_field]]
        bos = self.tok.bos_id
        return {"ids": [[bos, *ids] for ids in self.tok.encode_batch(texts)],
                "n_bytes": [len(t.encode("utf-8")) for t in texts], "n_chars": [len(t) for t in texts]}


class _ShardWriter:
    """Appends token arrays to `<split>_NNN.bin` files, opening the next one at `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.fh = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.fh is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._next()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype, copy=False).tofile(self.fh)
            self.shards[-1]["n_tokens"] += len(part)

    def _next(self) -> None:
        if self.fh is not None:
            self.fh.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.fh = (self.out_dir / name).open("wb")
        self.shards.append({"file": name, "n_tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self.fh is not None:
            self.fh.close()
        return self.shards


def _batches(encoded: Any, batch_docs: int, dtype: np.dtype) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
    """(ids, {n_docs, n_bytes, n_chars}) per batch of encoded documents."""
    import datasets

    if isinstance(encoded, datasets.Dataset):
        # The cache files read in order into buffers that are freed: iterating the dataset's memory
        # map instead would keep every page it touched resident, and RSS would grow with the corpus.
        import pyarrow as pa

        for cache in encoded.cache_files:
            with pa.OSFile(cache["filename"]) as src:
                for batch in pa.ipc.open_stream(src):
                    ids = batch.column("ids").flatten().to_numpy(zero_copy_only=False)
                    yield ids, {"n_docs": batch.num_rows, "n_bytes": int(batch.column("n_bytes").to_numpy().sum()),
                                "n_chars": int(batch.column("n_chars").to_numpy().sum())}
    else:  # a stream as Python lists: formatting it as Arrow would cost more than tokenizing it
        for batch in encoded.iter(batch_size=batch_docs):
            ids = np.fromiter(itertools.chain.from_iterable(batch["ids"]), dtype=dtype)
            yield ids, {"n_docs": len(batch["ids"]), "n_bytes": sum(batch["n_bytes"]), "n_chars": sum(batch["n_chars"])}


def write_shards(docs: Any, tok: ChatTokenizer, out_dir: Path, split: str, cfg: CorpusConfig) -> dict[str, Any]:
    """Tokenize `docs` into `out_dir/<split>_NNN.bin` and `<split>.json`; returns that meta."""
    import datasets

    dtype = token_dtype(tok.vocab_size)
    encode = _Encode(tok, cfg.text_field)
    kwargs = {"batched": True, "batch_size": cfg.batch_docs, "remove_columns": _columns(docs)}
    writer = _ShardWriter(out_dir, split, dtype, cfg.shard_tokens)
    totals: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix=f".{split}-map-", dir=out_dir) as cache:
        if isinstance(docs, datasets.Dataset):  # Arrow on disk: may fan out, spills to a temporary cache
            features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name)),
                                          "n_bytes": datasets.Value("int64"), "n_chars": datasets.Value("int64")})
            encoded = docs.map(encode, num_proc=cfg.num_proc, features=features, load_from_cache_file=False,
                               cache_file_name=str(Path(cache) / "ids.arrow"), desc=f"tokenizing {split}", **kwargs)
        else:  # lazy: each batch is tokenized as the loop below pulls it
            encoded = docs.map(encode, **kwargs)
        # a stream is tokenized as this loop pulls it, so this is its only bar (no total: a stream has no length)
        with Progress(TextColumn(f"writing {split} shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, disable=not interactive()) as bar:  # piped, a transient bar is a blank line
            task = bar.add_task("", total=len(docs) if isinstance(docs, datasets.Dataset) else None)
            for ids, counts in _batches(encoded, cfg.batch_docs, dtype):
                writer.write(ids)
                totals.update(counts)
                bar.advance(task, counts["n_docs"])
        del encoded  # release the cache's memory map before the directory goes
    shards = writer.close()
    meta = {"split": split, "dtype": dtype.name, "n_tokens": sum(s["n_tokens"] for s in shards),
            **{k: totals[k] for k in ("n_docs", "n_bytes", "n_chars")}, "bos_id": tok.bos_id,
            "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256, "shards": shards}
    (out_dir / f"{split}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_tokens(splits: dict[str, Any], tok: ChatTokenizer, out_dir: Path, cfg: CorpusConfig) -> dict[str, dict]:
    """Shards for every split, into a temporary sibling that replaces `out_dir` only when all are done."""
    with atomic_dir(out_dir) as tmp:
        return {split: write_shards(docs, tok, tmp, split, cfg) for split, docs in splits.items()}


# ------------------------------------------------------------------ reading shards

SHARD_FIX = "rerun the tokenizer stage (dvc repro -f tokenizer)"
_INDEX_FIELDS: dict[str, type] = {"split": str, "dtype": str, "n_tokens": int, "n_bytes": int, "shards": list,
                                  "tokenizer_sha256": str}


def read_index(path: Path, split: str) -> dict[str, Any]:
    """`<split>.json`, refused (naming it) unless it is the index of split `split`: its fields of their types, a
    dtype shards are written in, each shard a plain file name and a token count, the counts adding up."""
    meta = read_json(path, SHARD_FIX, missing=f"{path} not found: run the tokenizer stage first (dvc repro tokenizer)")
    for field, kind in _INDEX_FIELDS.items():
        if not isinstance(meta.get(field), kind) or isinstance(meta.get(field), bool):
            what = json_type(meta[field]) if field in meta else "missing"
            raise ValueError(f"{path}: field {field!r} is {what}, not {json_type(kind())}: {SHARD_FIX}")
    if meta["split"] != split:
        raise ValueError(f"{path} is the index of split {meta['split']!r}, not {split!r}: {SHARD_FIX}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype {meta['dtype']!r} is not one shards are written in (uint16, uint32): "
                         f"{SHARD_FIX}")
    for i, shard in enumerate(meta["shards"]):
        file, n = (shard.get("file"), shard.get("n_tokens")) if isinstance(shard, dict) else (None, None)
        if not isinstance(file, str) or Path(file).name != file or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}: shards[{i}] is not {{file: a name in {path.parent}, n_tokens: a count}}: "
                             f"{SHARD_FIX}")
    if sum(s["n_tokens"] for s in meta["shards"]) != meta["n_tokens"]:
        raise ValueError(f"{path}: its shards' n_tokens do not add up to its n_tokens ({meta['n_tokens']}): "
                         f"{SHARD_FIX}")
    return meta


class TokenShards:
    """One split's shards as one flat, read-only token stream (memory-mapped, so nothing is loaded).

    Pickles without its memory maps (they are reopened on first use), so DataLoader workers get
    the paths, not a copy of the data.
    """

    def __init__(self, tokens_dir: str | Path, split: str) -> None:
        self.dir, self.split = Path(tokens_dir), split
        self.meta: dict[str, Any] = read_index(self.dir / f"{split}.json", split)
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.cumsum([0] + [s["n_tokens"] for s in self.meta["shards"]])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens_per_byte(self) -> float:
        """Tokens (<|bos|> included) per UTF-8 byte of text: loss per token × this / ln 2 = bits per byte."""
        return self.meta["n_tokens"] / max(self.meta["n_bytes"], 1)

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = []
            for shard in self.meta["shards"]:
                path = self.dir / shard["file"]
                require_file(path, SHARD_FIX)
                if path.stat().st_size != shard["n_tokens"] * self.dtype.itemsize:
                    raise ValueError(f"{path} is {path.stat().st_size} bytes, not the {shard['n_tokens']} "
                                     f"{self.dtype.name} tokens {self.dir / (self.split + '.json')} says: {SHARD_FIX}")
                # an empty shard cannot be memory-mapped; it holds nothing to read anyway
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r") if shard["n_tokens"]
                                  else np.empty(0, self.dtype))
        return self._maps

    def verify(self, vocab_size: int, chunk: int = 1 << 26) -> None:
        """Refuse a shard of another size than the index says, or holding an id outside a `vocab_size` vocabulary
        (a flipped byte: training would index past the embedding). Reads every token once, `chunk` at a time: about
        a second per few GB from the page cache."""
        for shard, tokens in zip(self.meta["shards"], self.maps):
            for start in range(0, len(tokens), chunk):
                part = tokens[start:start + chunk]
                if part.max() >= vocab_size:
                    at = start + int(np.argmax(part >= vocab_size))
                    raise ValueError(f"{self.dir / shard['file']}: token {at} is id {int(tokens[at])}, outside the "
                                     f"tokenizer's {vocab_size} ids: the file is damaged; {SHARD_FIX}")

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) is outside {self.split}'s {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i, done = int(np.searchsorted(self.offsets, start, side="right")) - 1, 0
        while done < length:
            lo = start + done - int(self.offsets[i])
            part = self.maps[i][lo:lo + length - done]
            out[done:done + len(part)] = part
            done, i = done + len(part), i + 1
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}


def check_token_shards(tokens_dir: Path, tok: ChatTokenizer) -> None:
    """Pretraining's token shards (before work): each split's index whole, written by the workspace's tokenizer,
    its shards the sizes it says and holding only ids of that tokenizer's vocabulary."""
    for split in SPLITS:
        shards = TokenShards(tokens_dir, split)
        if shards.meta["tokenizer_sha256"] != tok.sha256:
            raise ValueError(f"{Path(tokens_dir) / f'{split}.json'} was written by another tokenizer than the "
                             "workspace's: rerun `dvc repro tokenizer`")
        shards.verify(tok.vocab_size)
