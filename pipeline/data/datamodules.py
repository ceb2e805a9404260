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

Every training order is a pure function of (seed, epoch), cut into global batches of batch_size x
world size of which rank r takes its slice (so the global batch is the same on any number of ranks,
and Lightning's DistributedSampler is not used), and every datamodule records in Lightning's
checkpoint how many batches of which epoch training consumed: a resumed run skips exactly those
(indices only, no data is read) and sees the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from pipeline.data.packing import collate as packed_rows
from pipeline.data.packing import collate_sequences as packed_sequences
from pipeline.data.packing import pack
from pipeline.data.shards import TokenShards
from pipeline.data.splits import load_split
from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer
from pipeline.dist import data_parallel
from pipeline.paths import TOKENS


class RandomWindows(IterableDataset):
    """Endless random training windows of block_size + 1 tokens.

    The generator is seeded by `seed` alone and draws `batch_size * world_size` starts per step;
    rank r keeps items [r * batch_size, (r + 1) * batch_size). So the global batch is the same
    whatever the number of data-parallel ranks: one process with batch 8 trains on the windows
    that two ranks with batch 4 share. DataLoader worker w of W yields steps w, w + W, ..., which
    the loader hands back in step order. `skip_steps` (resume) draws the first steps' starts and
    yields nothing for them.
    """

    def __init__(self, tokens: TokenShards, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, skip_steps: int = 0) -> None:
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.rank, self.world_size, self.skip_steps = rank, world_size, skip_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        g = torch.Generator().manual_seed(self.seed)
        hi = len(self.tokens) - self.block_size - 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in itertools.count():
            starts = torch.randint(0, hi + 1, (self.batch_size * self.world_size,), generator=g)
            if step < self.skip_steps or (step - self.skip_steps) % n_workers != worker:
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


def rank_share(dataset) -> Sampler[int] | None:
    """Validation rows for this rank: every world_size-th, in order (None = all, without ranks). With
    `limit_val_batches`, the ranks together score the rows one process would."""
    rank, world = data_parallel()
    if world == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


class RankRows(Sampler[int]):
    """One rank's validation rows: rank, rank + world, ..., padded with -1 to ceil(n / world) rows, so that every
    rank runs as many batches (under DDP and FSDP a forward is a collective). `Weighted` gives a pad weight 0."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.rows = list(range(rank, n, world))
        self.rows += [-1] * (-(-n // world) - len(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


class Weighted(Dataset):
    """`rows` as (row, weight 1.0); index -1 (RankRows' padding) as (the first row, weight 0.0)."""

    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple:
        return (self.rows[0], 0.0) if i < 0 else (self.rows[i], 1.0)


class Resumable:
    """LightningDataModule mixin: Lightning's checkpoint records how far training got in the epoch
    (`state_dict`), and the train dataloader built after a resume skips those batches (`resume_at`)."""

    _resume_at: tuple[int, int] = (0, 0)

    def state_dict(self) -> dict:
        trainer = self.trainer
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def resume_at(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) once after a resume, else (0, 0)."""
        at, self._resume_at = self._resume_at, (0, 0)
        return at


class GlobalBatchSampler(Sampler[int]):
    """Base: an epoch's global batches (`global_batches`, each of batch_size x world_size indices, a
    pure function of seed and epoch); rank r yields its slice of each. `start(epoch, skip)` makes the
    next iteration begin after `skip` global batches of `epoch` (resume). The length stays the
    epoch's full length, which is what Lightning counts a resumed epoch against."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def start(self, epoch: int, skip: int) -> GlobalBatchSampler:
        self.epoch, self.skip = epoch, skip
        return self

    def global_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n // self.global_batch * self.batch_size

    def __iter__(self):
        skip, self.skip = self.skip, 0
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return iter([i for batch in self.global_batches()[skip:] for i in batch[mine]])


class ShuffledSampler(GlobalBatchSampler):
    """A new permutation of all rows each epoch (seed + epoch); a last partial global batch is dropped."""

    def global_batches(self) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        full = self.n // self.global_batch * self.global_batch
        return [order[i:i + self.global_batch] for i in range(0, full, self.global_batch)]


class DrawSampler(GlobalBatchSampler):
    """`n` rows drawn with replacement from `rows` (one epoch of n // batch_size batches)."""

    def __init__(self, rows: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(n, batch_size, seed, rank, world_size)
        self.rows = rows

    def global_batches(self) -> list[list[int]]:
        full = self.n // self.global_batch * self.global_batch
        draws = torch.randint(0, self.rows, (full,), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return draws.view(-1, self.global_batch).tolist()


class PretrainData(Resumable, L.LightningDataModule):
    """Token windows memory-mapped from the shards the tokenizer stage wrote (`data/tokens`).

    After `setup`, `val_tokens_per_byte` converts validation loss to bits per byte.
    """

    def __init__(self, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 tokens_dir: Path = TOKENS, num_workers: int = 0) -> None:
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
        _, skip = self.resume_at()  # one endless epoch: batches = steps
        windows = RandomWindows(self.train_tokens, self.block_size, self.batch_size, self.seed, rank, world, skip)
        return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        windows = FixedWindows(self.val_tokens, self.block_size)
        return DataLoader(windows, batch_size=self.batch_size, sampler=rank_share(windows),
                          num_workers=self.num_workers)


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def split_holdout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(len(rows) * fraction))
    return rows[n_val:], rows[:n_val]


class LengthGroupedSampler(GlobalBatchSampler):
    """Shuffled global batches, each holding rows of one length band.

    Each epoch shuffles all rows (seed + epoch), cuts the order into groups of `group` global batches,
    orders each group by length band (`length // band`; random within a band), and shuffles the order
    of the full batches cut from it. Bands are wide on purpose: direct answers (one band) still share
    batches across task families, while worked solutions, 3x longer, no longer make every batch pad to them.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, band: int = 32, group: int = 16,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(len(lengths), batch_size, seed, rank, world_size)
        self.lengths, self.band, self.group = lengths, band, group

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        size = self.global_batch
        batches: list[list[int]] = []
        for start in range(0, self.n, size * self.group):  # a stable sort keeps the shuffled order within a band
            chunk = sorted(order[start:start + size * self.group], key=lambda i: self.lengths[i] // self.band)
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        full = [b for b in batches if len(b) == size]
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()]


class HeldOutData(Resumable, L.LightningDataModule):
    """Base: rows encoded into `train_set` / `val_set` by `setup`, batched by the subclass's `collate`."""

    train_set: list
    val_set: list
    batch_size: int
    seed: int
    collate: Callable[[list], dict]

    def train_dataloader(self) -> DataLoader:
        rank, world = data_parallel()
        sampler = ShuffledSampler(len(self.train_set), self.batch_size, self.seed, rank, world).start(*self.resume_at())
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=rank_share(self.val_set),
                          collate_fn=self.collate)


class ChatData(HeldOutData):
    """SFT conversations; a held-out slice of them is the validation set."""

    def __init__(self, data_dir: Path, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 val_fraction: float = 0.05, packing: bool = False) -> None:
        """`packing`: each batch's conversations packed into rows of `block_size` (pipeline.data.packing) rather
        than padded to the longest: the same batches, the same loss, fewer positions computed."""
        super().__init__()
        self.data_dir, self.tok, self.block_size = data_dir, tok, block_size
        self.batch_size, self.seed, self.val_fraction, self.packing = batch_size, seed, val_fraction, packing

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
        if self.packing:  # shuffled batches mix lengths, which pack tighter than a length band's
            return super().train_dataloader()
        rank, world = data_parallel()
        sampler = LengthGroupedSampler([len(ids) for ids, _ in self.train_set], self.batch_size, self.seed,
                                       rank=rank, world_size=world).start(*self.resume_at())
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          drop_last=True)

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict:
        if self.packing:
            rows = pack([len(ids) for ids, _ in items], self.block_size)
            return packed_rows([[items[i] for i in row] for row in rows], self.block_size, self.tok.pad_id)
        ids = [i for i, _ in items]
        return {"input_ids": pad_right(ids, self.tok.pad_id), "labels": pad_right([labels for _, labels in items],
                IGNORE_INDEX), "attention_mask": pad_right([[1] * len(i) for i in ids], 0).bool()}


class PreferenceData(HeldOutData):
    """Preference pairs; each batch stacks all chosen sequences, then all rejected ones.

    `extra_rows`: more pairs, or a function of the trainer that makes them in `setup`, once the processes and
    their devices exist (the on-policy pairs, sampled by every rank for its share: pipeline.training.reward).
    """

    def __init__(self, data_dir: Path, tok: ChatTokenizer, block_size: int, batch_size: int, seed: int,
                 val_fraction: float, extra_rows: list[dict] | Callable[[L.Trainer], list[dict]] | None = None,
                 packing: bool = False) -> None:
        """`packing`: each batch's sequences (chosen ones first, then rejected ones) packed into rows
        (pipeline.data.packing.collate_sequences) rather than padded."""
        super().__init__()
        self.data_dir, self.tok, self.block_size = data_dir, tok, block_size
        self.batch_size, self.seed, self.val_fraction = batch_size, seed, val_fraction
        self.extra_rows = extra_rows or []
        self.packing = packing

    def encode(self, row: dict) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
        """((chosen ids, prompt length), (rejected ids, prompt length))."""
        n_prompt = len(self.tok.prompt(row["prompt"]))
        chosen, _ = self.tok.conversation(row["prompt"], row["chosen"])
        rejected, _ = self.tok.conversation(row["prompt"], row["rejected"], with_end=row.get("rejected_has_end", True))
        return (chosen[:self.block_size], n_prompt), (rejected[:self.block_size], n_prompt)

    def setup(self, stage: str | None = None) -> None:
        if callable(self.extra_rows):
            self.extra_rows = self.extra_rows(self.trainer)
        rows = load_split(self.data_dir, "preference") + self.extra_rows
        self.train_rows, self.val_rows = split_holdout(rows, self.val_fraction, self.seed)
        self.train_set = [self.encode(r) for r in self.train_rows]
        self.val_set = [self.encode(r) for r in self.val_rows]

    def val_dataloader(self) -> DataLoader:
        """Held-out pairs, each rank its share; batches carry `weight` (B,), 0 for padding rows (RankRows), for
        means over exactly the held-out pairs (Objective.accumulate)."""
        rank, world = data_parallel()
        return DataLoader(Weighted(self.val_set), batch_size=self.batch_size, sampler=RankRows(len(self.val_set),
                          rank, world), collate_fn=self.collate_weighted)

    def collate_weighted(self, items: list[tuple]) -> dict:
        return {**self.collate([pair for pair, _ in items]), "weight": torch.tensor([w for _, w in items])}

    def collate(self, pairs: list) -> dict:
        items = [c for c, _ in pairs] + [r for _, r in pairs]
        if self.packing:
            return packed_sequences(items, self.block_size, self.tok.pad_id)
        ids = pad_right([s for s, _ in items], self.tok.pad_id)
        pos = torch.arange(ids.size(1))[None, :]
        lengths = torch.tensor([len(s) for s, _ in items])[:, None]
        starts = torch.tensor([n for _, n in items])[:, None]
        return {"input_ids": ids, "last": lengths[:, 0] - 1,
                "response_mask": ((pos >= starts) & (pos < lengths)).float()}


class PromptData(Resumable, L.LightningDataModule):
    """RL prompts drawn with replacement: `steps` global batches of `batch_size` rows, one per RL iteration.

    `batch_size` is the global rollout batch: rank r of W takes rows [r * batch_size / W, (r + 1) * batch_size / W)
    of each, so every drawn prompt is sampled by exactly one rank and the rollout does not depend on W."""

    def __init__(self, data_dir: Path, batch_size: int, steps: int, seed: int) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.steps, self.seed = data_dir, batch_size, steps, seed

    def setup(self, stage: str | None = None) -> None:
        self.rows = load_split(self.data_dir, "rl_prompts")
        if not self.rows:
            raise ValueError(f"{self.data_dir}/rl_prompts.jsonl is empty: raise data.sizes.rl_prompts")

    def train_dataloader(self) -> DataLoader:
        rank, world = data_parallel()
        if self.batch_size % world:
            raise ValueError(f"align.rollout_batch ({self.batch_size}) does not split over {world} processes: make "
                             "it a multiple of trainer.devices x trainer.num_nodes")
        share = self.batch_size // world
        sampler = DrawSampler(len(self.rows), self.steps * self.batch_size, share, self.seed, rank,
                              world).start(*self.resume_at())
        return DataLoader(self.rows, batch_size=share, sampler=sampler, collate_fn=list)
