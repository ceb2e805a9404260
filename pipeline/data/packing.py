"""Padding-free packing: whole conversations laid one after another in rows of a fixed width.

`pack` assigns examples to rows by best-fit decreasing (longest first, each into the row it fills most
tightly; ties by index), which is deterministic and wastes little: every row but a few is nearly full.
`collate` lays a row out: the examples' ids one after another, their labels as given (the pipeline's labels are
already shifted, each position's target within its own example, so no target crosses into the next example),
`document_ids` numbering the examples (padding gets one of its own), and right padding to the width. The GPT
takes `document_ids` and attends only within a document, with positions restarting at each (`GPT.hidden`), so a
packed row computes exactly what its examples compute alone.

Written here rather than taken from TRL or torchtune: their packing is bound to their trainers and datasets,
and this one must keep the pipeline's samplers' determinism (a row is a fixed list of example indices).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from pipeline.data.tokenizer import IGNORE_INDEX


def pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `width` (best-fit decreasing)."""
    too_long = [i for i, n in enumerate(lengths) if n > width]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packed row's "
                         f"{width}: raise model.block_size or drop longer examples")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = width, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - lengths[i] > 0:
            insort(free, (room - lengths[i], r))
    return rows


def padding_fraction(lengths: Sequence[int], rows: Sequence[Sequence[int]], width: int) -> float:
    """The share of the rows' positions that hold padding."""
    return 1 - sum(lengths) / max(len(rows) * width, 1)


def collate(examples: Sequence[Sequence[tuple[list[int], list[int]]]], width: int,
            pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row per item of `examples` (each a list of (ids, labels)): input_ids, labels, document_ids,
    attention_mask, each (B, W), W the fullest row's length (at most `width`: no column of padding only)."""
    B = len(examples)
    width = min(width, max((sum(len(x) for x, _ in row) for row in examples), default=0))
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    docs = torch.full((B, width), -1, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for b, row in enumerate(examples):
        at = 0
        for d, (x, y) in enumerate(row):
            n = len(x)
            if at + n > width:
                raise ValueError(f"packed row {b} holds {at + n} tokens, more than its width {width}")
            ids[b, at:at + n] = torch.tensor(x)
            labels[b, at:at + n] = torch.tensor(y)
            docs[b, at:at + n] = d
            mask[b, at:at + n] = True
            at += n
    return {"input_ids": ids, "labels": labels, "document_ids": docs, "attention_mask": mask}


def sequence_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The real tokens of a preference batch, padded or packed: its sequences' lengths summed (no padding)."""
    if "sequence_ids" in batch:
        return (batch["sequence_ids"] >= 0).sum()
    return (batch["last"] + 1).sum()  # padded rows: each sequence's last position is its length - 1


def padding_share(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The share of a chat or preference batch's positions that hold padding, padded or packed: what packing
    saves (logged as train/padding by the stages that train on such batches)."""
    real = batch["attention_mask"].sum() if "attention_mask" in batch else sequence_tokens(batch)
    return 1 - real / batch["input_ids"].numel()


def collate_sequences(items: Sequence[tuple[list[int], int]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Preference sequences (ids, prompt length), each batch's chosen ones then rejected ones, packed into rows:
    input_ids, document_ids, `sequence_ids` (which sequence each position holds, -1 none), `response_mask` (the
    response tokens) and `last` (each sequence's last position in the flattened rows: where a reward model reads
    its score), in the order of `items`, so chosen/rejected pairing is kept."""
    rows = pack([len(ids) for ids, _ in items], width)
    width = min(width, max(sum(len(items[i][0]) for i in row) for row in rows))
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    docs = torch.full((R, width), -1, dtype=torch.long)
    seqs = torch.full((R, width), -1, dtype=torch.long)
    response = torch.zeros(R, width)
    last = torch.zeros(len(items), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, s in enumerate(row):
            x, n_prompt = items[s]
            n = len(x)
            ids[r, at:at + n] = torch.tensor(x)
            docs[r, at:at + n], seqs[r, at:at + n] = d, s
            response[r, at + n_prompt:at + n] = 1.0
            last[s] = r * width + at + n - 1
            at += n
    return {"input_ids": ids, "document_ids": docs, "sequence_ids": seqs, "response_mask": response, "last": last}
