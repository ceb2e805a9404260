"""SFT training throughput with and without packing, side by side in one process.

    python -m benchmarks.packing [--rounds 3] [--steps 10] [--warmup 2] [--batch 64] [--quick]

Both sides train a fresh copy of the workspace's model shape (params.yaml: `model`, seeded, fp32, one thread) with
a plain loop (forward, loss, backward, AdamW) on the workspace's SFT conversations (data/prepared, the workspace's
tokenizer), as `ChatData` gives them to the sft stage:
  padded   batches of `--batch` conversations from the length-grouped sampler, padded to their longest;
  packed   the same batches, each packed into rows of at most `block_size` (`ChatData(packing=True)`,
           pipeline.data.packing): the same loss, fewer positions.
Reported per side: real (non-padding) tokens/s, answer (label) tokens/s and the padding fraction of the batches
timed. Rounds alternate the sides; medians are compared. The last line is JSON with `ratio` = packed ÷ padded real
tokens/s.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import json
import statistics
import time

import torch

from pipeline import paths
from pipeline.config.load import load_params
from pipeline.config.root import load_config
from pipeline.data.datamodules import ChatData
from pipeline.data.tokenizer import IGNORE_INDEX, load_tokenizer
from pipeline.model.gpt import GPT
from pipeline.training.lm import lm_loss


def batches(data: ChatData, n: int) -> list[dict]:
    loader = data.train_dataloader()
    return list(itertools.islice(iter(loader), n))


def run(model_fn, batches_: list[dict], warmup: int, pad_id: int) -> dict:
    model = model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    real = labels = positions = 0
    began = None
    for i, b in enumerate(batches_):
        if i == warmup:
            began = time.perf_counter()
        packed = {"document_ids": b["document_ids"]} if "document_ids" in b else {}
        loss = lm_loss(model(b["input_ids"], **packed), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            mask = b["attention_mask"] if "attention_mask" in b else b["input_ids"] != pad_id
            real += int(mask.sum())
            labels += int((b["labels"] != IGNORE_INDEX).sum())
            positions += b["input_ids"].numel()
    took = time.perf_counter() - began
    return {"tokens_s": real / took, "label_tokens_s": labels / took, "padding": 1 - real / positions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="1 round of 3 steps")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(load_params())
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    shape = cfg.model.shape(tok.vocab_size)
    n = args.warmup + args.steps
    sides = []
    for packing in (False, True):  # the same sampler and seed: the same conversations in every batch
        data = ChatData(paths.PREPARED, tok, shape.block_size, args.batch, cfg.seed, packing=packing)
        data.setup()
        sides.append(batches(data, n))
    plain, packed = sides
    rows = statistics.mean(b["input_ids"].size(0) for b in packed)

    def fresh() -> GPT:
        torch.manual_seed(0)
        return GPT(shape)

    results: dict[str, list[dict]] = {"padded": [], "packed": []}
    for _ in range(args.rounds):
        results["padded"].append(run(fresh, plain, args.warmup, tok.pad_id))
        results["packed"].append(run(fresh, packed, args.warmup, tok.pad_id))
    out = {"batch": args.batch, "packed_rows": round(rows, 1), "block_size": shape.block_size, "steps": args.steps,
           "rounds": args.rounds, "threads": torch.get_num_threads()}
    for side, runs in results.items():
        for key in ("tokens_s", "label_tokens_s", "padding"):
            out[f"{side}_{key}"] = round(statistics.median(r[key] for r in runs), 4 if key == "padding" else 1)
        print(f"{side:7s}: {out[side + '_tokens_s']:9.1f} tokens/s  {out[side + '_label_tokens_s']:8.1f} answer "
              f"tokens/s  padding {out[side + '_padding']:.1%}")
    out["ratio"] = round(out["packed_tokens_s"] / out["padded_tokens_s"], 2)
    out["ratio_label"] = round(out["packed_label_tokens_s"] / out["padded_label_tokens_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
