"""LightningDataModules that turn prepared splits into token batches for each objective.

- PretrainData: the token shards of the tokenizer stage (documents joined into one stream, each
  opened by <|bos|>), memory-mapped; training draws random windows of block_size + 1 tokens forever
  (the step budget ends training), the same global batch on any number of ranks; validation reads
  fixed consecutive windows of the held-out documents.
- ChatData: SFT conversations (one or more exchanges) → (input_ids, labels) right-padded; loss only
  on the assistant's replies. Training
  batches are grouped by length (worked solutions are 3x longer than direct answers, and a batch
  pads to its longest row), without sorting families apart.
- PreferenceData: (chosen, rejected) sequences for the reward model, stacked chosen-first.
- PromptData: RL prompts, one list of rows per rollout batch.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from pipeline.data.prepare import load_split
from pipeline.data.shards import TOKENS_DIR, TokenShards
from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer


class RandomWindows(IterableDataset):
    """Endless random training windows of block_size + 1 tokens.

    The generator is seeded by `seed` alone and draws `batch_size * world_size` starts per step;
    rank r keeps items [r * batch_size, (r + 1) * batch_size). So the global batch is the same
    whatever the number of data-parallel ranks: one process with batch 8 trains on the windows
    that two ranks with batch 4 share. DataLoader worker w of W yields steps w, w + W, ..., which
    the loader hands back in step order.
    """

    def __init__(self, tokens: TokenShards, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        g = torch.Generator().manual_seed(self.seed)
        hi = len(self.tokens) - self.block_size - 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in itertools.count():
            starts = torch.randint(0, hi + 1, (self.batch_size * self.world_size,), generator=g)
            if step % n_workers != worker:
                continue
            for i in starts[mine].tolist():
                w = torch.from_numpy(self.tokens.window(i, self.block_size + 1))
                yield {"input_ids": w[:-1], "labels": w[1:]}


class FixedWindows(Dataset):
    """Consecutive windows from the start of the stream: the same validation tokens every time."""

    def __init__(self, tokens: TokenShards, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.n = max(0, (len(tokens) - 1) // block_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        w = torch.from_numpy(self.tokens.window(i * self.block_size, self.block_size + 1))
        return {"input_ids": w[:-1], "labels": w[1:]}


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PretrainData(L.LightningDataModule):
    """Token windows memory-mapped from the shards the tokenizer stage wrote (`data/tokens`).

    After `setup`, `val_tokens_per_byte` converts validation loss to bits per byte.
    """

    def __init__(self, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 tokens_dir: Path = TOKENS_DIR, num_workers: int = 0) -> None:
        super().__init__()
        self.tok, self.block_size, self.batch_size, self.seed = tok, block_size, batch_size, seed
        self.tokens_dir, self.num_workers = Path(tokens_dir), num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_tokens = TokenShards(self.tokens_dir, "pretrain")
        self.val_tokens = TokenShards(self.tokens_dir, "pretrain_val")
        for name, t in (("pretrain", self.train_tokens), ("pretrain_val", self.val_tokens)):
            if self.tok.sha256 and t.meta["tokenizer_sha256"] != self.tok.sha256:
                raise ValueError(f"{self.tokens_dir}/{name}.json was written by another tokenizer: "
                                 "rerun the tokenizer stage (dvc repro tokenizer)")
            if len(t) <= self.block_size + 1:
                raise ValueError(f"split {name!r} has {len(t)} tokens, fewer than model.block_size + 2: "
                                 "raise data.sizes or lower model.block_size")
        self.val_tokens_per_byte: float = self.val_tokens.tokens_per_byte

    def train_dataloader(self) -> DataLoader:
        rank, world = data_parallel()
        windows = RandomWindows(self.train_tokens, self.block_size, self.batch_size, self.seed, rank, world)
        return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(FixedWindows(self.val_tokens, self.block_size), batch_size=self.batch_size,
                          num_workers=self.num_workers)


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def split_holdout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(len(rows) * fraction))
    return rows[n_val:], rows[:n_val]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of `batch_size` holds rows of one length band.

    Each epoch shuffles all rows (seed + epoch), cuts the order into groups of `group` batches, orders
    each group by length band (`length // band`; random within a band), and shuffles the order of the
    batches cut from it. Bands are wide on purpose: direct answers (one band) still share batches
    across task families, while worked solutions, 3x longer, no longer make every batch pad to them.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, band: int = 32, group: int = 16) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.band, self.group = band, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        span = self.batch_size * self.group
        batches: list[list[int]] = []
        for start in range(0, len(order), span):  # a stable sort keeps the shuffled order within a band
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i] // self.band)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]  # a short batch goes last (drop_last drops it)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return iter([i for b in shuffled + [b for b in batches if len(b) < self.batch_size] for i in b])


class HeldOutData(L.LightningDataModule):
    """Base: rows encoded into `train_set` / `val_set` by `setup`, batched by the subclass's `collate`."""

    train_set: list
    val_set: list
    batch_size: int
    seed: int
    collate: Callable[[list], dict]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self.collate)


class ChatData(HeldOutData):
    """SFT conversations; a held-out slice of them is the validation set."""

    def __init__(self, data_dir: Path, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 val_fraction: float = 0.05) -> None:
        super().__init__()
        self.data_dir, self.tok, self.block_size = data_dir, tok, block_size
        self.batch_size, self.seed, self.val_fraction = batch_size, seed, val_fraction

    def encode(self, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        out = []
        for row in rows:
            ids, labels = self.tok.chat(row["messages"])
            if len(ids) > self.block_size:
                raise ValueError(f"an SFT conversation has {len(ids)} tokens > model.block_size "
                                 f"{self.block_size}: raise block_size or shorten data "
                                 f"({row['messages'][-2]['content']!r})")
            out.append((ids[:-1], labels[1:]))
        return out

    def setup(self, stage: str | None = None) -> None:
        train, val = split_holdout(load_split(self.data_dir, "sft"), self.val_fraction, self.seed)
        self.train_set, self.val_set = self.encode(train), self.encode(val)

    def train_dataloader(self) -> DataLoader:
        sampler = LengthGroupedSampler([len(ids) for ids, _ in self.train_set], self.batch_size, self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          drop_last=True)

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict:
        return {"input_ids": pad_right([i for i, _ in items], self.tok.pad_id),
                "labels": pad_right([l for _, l in items], IGNORE_INDEX)}


class PreferenceData(HeldOutData):
    """Preference pairs; each batch stacks all chosen sequences, then all rejected ones."""

    def __init__(self, data_dir: Path, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 val_fraction: float, extra_rows: list[dict] | None = None) -> None:
        super().__init__()
        self.data_dir, self.tok, self.block_size = data_dir, tok, block_size
        self.batch_size, self.seed, self.val_fraction = batch_size, seed, val_fraction
        self.extra_rows = extra_rows or []

    def encode(self, row: dict) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
        """((chosen ids, prompt length), (rejected ids, prompt length))."""
        n_prompt = len(self.tok.prompt(row["prompt"]))
        chosen, _ = self.tok.conversation(row["prompt"], row["chosen"])
        rejected, _ = self.tok.conversation(row["prompt"], row["rejected"], with_end=row.get("rejected_has_end", True))
        return (chosen[:self.block_size], n_prompt), (rejected[:self.block_size], n_prompt)

    def setup(self, stage: str | None = None) -> None:
        rows = load_split(self.data_dir, "preference") + self.extra_rows
        self.train_rows, self.val_rows = split_holdout(rows, self.val_fraction, self.seed)
        self.train_set = [self.encode(r) for r in self.train_rows]
        self.val_set = [self.encode(r) for r in self.val_rows]

    def collate(self, pairs: list) -> dict:
        items = [c for c, _ in pairs] + [r for _, r in pairs]
        ids = pad_right([s for s, _ in items], self.tok.pad_id)
        pos = torch.arange(ids.size(1))[None, :]
        lengths = torch.tensor([len(s) for s, _ in items])[:, None]
        starts = torch.tensor([n for _, n in items])[:, None]
        return {"input_ids": ids, "last": lengths[:, 0] - 1,
                "response_mask": ((pos >= starts) & (pos < lengths)).float()}


class PromptData(L.LightningDataModule):
    """RL prompts drawn with replacement: `steps` batches of `batch_size` rows, one per RL iteration."""

    def __init__(self, data_dir: Path, batch_size: int, steps: int, seed: int) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.steps, self.seed = data_dir, batch_size, steps, seed

    def setup(self, stage: str | None = None) -> None:
        self.rows = load_split(self.data_dir, "rl_prompts")
        if not self.rows:
            raise ValueError(f"{self.data_dir}/rl_prompts.jsonl is empty: raise data.sizes.rl_prompts")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(self.rows, replacement=True,
                                                 num_samples=self.steps * self.batch_size, generator=g)
        return DataLoader(self.rows, batch_size=self.batch_size, sampler=sampler, collate_fn=list)
