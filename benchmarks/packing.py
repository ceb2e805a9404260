"""Training throughput with and without packing, side by side in one process, on three workloads.

    python -m benchmarks.packing [--rounds 5] [--steps 20] [--warmup 2] [--batch 64] [--quick] [--workspace DIR]

Every side trains a fresh copy of the workspace's model shape (params.yaml: `model`, seeded, fp32, one thread) with
a plain loop (forward, loss, backward, AdamW), on batches laid out the way the stages' datamodules lay them out:
  sft        the workspace's SFT conversations (data/prepared), the sft stage's objective (LM loss on the answers).
             padded: batches of `--batch` from the length-grouped sampler (`ChatData`), padded to their longest;
             packed: the same conversations, shuffled into batches of `--batch` and each batch packed into rows of
             at most `block_size` (`ChatData(packing=True)`, pipeline.data.packing).
  sft_wide   as sft, on conversations generated here with a wider length spread: the multi-turn share raised
             (data.multi_turn.fraction 0.4 and max_turns 4; the default data: 0.2 and 3), nothing written to disk.
             Lengths: mean 42 tokens, sd 21, up to 116 (the default data: mean 35, sd 18, up to 88).
  reward     the workspace's preference pairs, the reward stage's step (`ScalarHead` with the likelihood term as
             `reward.likelihood_term` says, pairwise loss) at reward.batch_size pairs, padded or packed
             (`PreferenceData(packing=True)`: chosen and rejected sequences packed, pairing kept). DPO and its
             variants lay out their batches the same way, with the policy and reference forwards instead.
SFT has a third side, shuffled_padded: the packed side's own shuffled batches, padded (what packing saves on the
batches it trains on; the length-grouped sampler exists to avoid that padding). All sides of a workload see
exactly the same examples (the padded side's batches decide which), so trained tokens (sft: the answer tokens
the loss reads; reward: every real token) are equal and the ratio of trained tokens/s is the ratio of times.
Reported per side: trained tokens/s and the padding fraction (padding positions ÷ all positions computed).
Rounds alternate the sides; medians are compared. The last line is JSON with
`<workload>_ratio` = packed ÷ padded trained tokens/s with the padding-only bound 1 / (1 - padded padding) beside
it, and for SFT `sft_ratio_vs_shuffled_padded` likewise.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline import paths
from pipeline.config.load import load_params
from pipeline.config.root import Config, load_config
from pipeline.data.datamodules import ChatData, LengthGroupedSampler, PreferenceData
from pipeline.data.prepare import generate
from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer, load_tokenizer
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead
from pipeline.model.logprobs import packed_keys
from pipeline.training.lm import lm_loss

WIDE = {"multi_turn": {"fraction": 0.4, "max_turns": 4}}  # the default data: 0.2 and 3


def sft_step(model: GPT, b: dict) -> torch.Tensor:
    packed = {"document_ids": b["document_ids"]} if "document_ids" in b else {}
    return lm_loss(model(b["input_ids"], **packed), b["labels"])


def reward_step(model: ScalarHead, b: dict) -> torch.Tensor:
    chosen, rejected = model(b["input_ids"], b["last"], response_mask=b["response_mask"], **packed_keys(b)).chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def real_positions(b: dict, pad_id: int) -> int:
    if "document_ids" in b:
        return int((b["document_ids"] >= 0).sum()) if "sequence_ids" not in b else int((b["sequence_ids"] >= 0).sum())
    if "labels" in b:  # padded SFT: right padding
        return int((b["input_ids"] != pad_id).sum())
    return int(b["last"].add(1).sum())  # padded preference: each row's length


def timed(model_fn: Callable[[], torch.nn.Module], step: Callable[[torch.nn.Module, dict], torch.Tensor],
          batches: list[dict], warmup: int, trained: Callable[[dict], int], pad_id: int) -> dict:
    model = model_fn()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    for b in batches[:warmup]:  # untimed: allocator and kernels warm, then every batch is timed
        step(model, b).backward()
        opt.zero_grad(set_to_none=True)
    tokens = real = positions = 0
    began = time.perf_counter()
    for b in batches:
        step(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += trained(b)
        real += real_positions(b, pad_id)
        positions += b["input_ids"].numel()
    took = time.perf_counter() - began
    return {"tokens_s": tokens / took, "padding": 1 - real / positions, "trained": tokens}


def sft_batches(data: ChatData, n: int, batch: int, seed: int) -> dict[str, list[dict]]:
    """padded: the first `n` batches of the length-grouped sampler, padded; packed: the same conversations shuffled
    into batches and packed; shuffled_padded: those shuffled batches padded."""
    sampler = LengthGroupedSampler([len(ids) for ids, _ in data.train_set], batch, seed)
    chosen = list(itertools.islice(sampler.global_batches(), n))
    flat = [i for b in chosen for i in b]
    random.Random(seed).shuffle(flat)
    shuffled = [flat[k:k + batch] for k in range(0, len(flat), batch)]
    sides = {}
    for side, batches, packing in (("padded", chosen, False), ("packed", shuffled, True),
                                   ("shuffled_padded", shuffled, False)):
        data.packing = packing
        sides[side] = [data.collate([data.train_set[i] for i in b]) for b in batches]
    return sides


def preference_batches(data: PreferenceData, n: int, batch: int) -> dict[str, list[dict]]:
    """The first `n` batches of pairs, padded and packed (the reward stage shuffles its pairs either way)."""
    pairs = [data.train_set[k:k + batch] for k in range(0, n * batch, batch)]
    sides = {}
    for side, packing in (("padded", False), ("packed", True)):
        data.packing = packing
        sides[side] = [data.collate(p) for p in pairs]
    return sides


def wide_chat(cfg: Config, tok: ChatTokenizer, block_size: int, batch: int, seed: int, rows: int) -> ChatData:
    """ChatData over `rows` conversations generated with the wider spread (WIDE), none written."""
    data_cfg = cfg.data.model_copy(update={
        "multi_turn": cfg.data.multi_turn.model_copy(update=WIDE["multi_turn"]),
        "sizes": cfg.data.sizes.model_copy(update={"sft": rows, "pretrain_docs": 50, "pretrain_val_docs": 5})})
    splits, _ = generate(data_cfg, skip=frozenset({"preference", "rl_prompts", "eval", "eval_hard"}))
    data = ChatData(paths.PREPARED, tok, block_size, batch, seed)
    data.train_set = data.encode(splits["sft"])
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed side")
    p.add_argument("--batch", type=int, default=64, help="SFT conversations per batch (the sft stage's)")
    p.add_argument("--quick", action="store_true", help="1 round of 3 steps")
    p.add_argument("--workspace", default=".", help="a directory where prepare and tokenizer have run (params.yaml)")
    args = p.parse_args()
    os.chdir(args.workspace)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(load_params())
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    shape = cfg.model.shape(tok.vocab_size)
    n = args.steps
    chat = ChatData(paths.PREPARED, tok, shape.block_size, args.batch, cfg.seed)
    chat.setup()
    pairs_per_batch = cfg.reward.batch_size
    prefs = PreferenceData(paths.PREPARED, tok, shape.block_size, pairs_per_batch, cfg.seed, 0.1)
    prefs.setup()
    wide = wide_chat(cfg, tok, shape.block_size, args.batch, cfg.seed, rows=args.batch * n * 2)

    def answers(b: dict) -> int:
        return int((b["labels"] != IGNORE_INDEX).sum())

    workloads = {
        "sft": (sft_step, answers, sft_batches(chat, n, args.batch, cfg.seed)),
        "sft_wide": (sft_step, answers, sft_batches(wide, n, args.batch, cfg.seed)),
        "reward": (reward_step, lambda b: real_positions(b, tok.pad_id), preference_batches(prefs, n, pairs_per_batch)),
    }
    models: dict[str, Callable[[], torch.nn.Module]] = {
        "sft": lambda: GPT(shape), "sft_wide": lambda: GPT(shape),
        "reward": lambda: ScalarHead(GPT(shape), likelihood_term=cfg.reward.likelihood_term)}

    out: dict = {"batch": args.batch, "pairs_per_batch": pairs_per_batch, "block_size": shape.block_size,
                 "steps": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads()}
    for name, (step, trained, sides) in workloads.items():
        def fresh(make=models[name]) -> torch.nn.Module:
            torch.manual_seed(0)
            return make()

        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, batches in sides.items():
                runs[side].append(timed(fresh, step, batches, args.warmup, trained, tok.pad_id))
        if len({rs[0]["trained"] for rs in runs.values()}) != 1:
            raise AssertionError(f"{name}: the sides trained on different tokens")
        for side, rs in runs.items():
            out[f"{name}_{side}_tokens_s"] = round(statistics.median(r["tokens_s"] for r in rs), 1)
            out[f"{name}_{side}_padding"] = round(statistics.median(r["padding"] for r in rs), 4)
        out[f"{name}_packed_rows"] = round(statistics.mean(b["input_ids"].size(0) for b in sides["packed"]), 1)
        line = f"{name:10s}:"
        for side in sides:
            tokens_s, padding = out[f"{name}_{side}_tokens_s"], out[f"{name}_{side}_padding"]
            line += f" {side} {tokens_s:7.1f} tok/s, padding {padding:.1%} |"
            if side == "packed":
                continue
            suffix = "" if side == "padded" else f"_vs_{side}"
            out[f"{name}_ratio{suffix}"] = round(out[f"{name}_packed_tokens_s"] / out[f"{name}_{side}_tokens_s"], 2)
            out[f"{name}_padding_bound{suffix}"] = round(1 / (1 - out[f"{name}_{side}_padding"]), 2)
        print(line, f"packed / padded {out[f'{name}_ratio']:.2f}x (padding alone bounds it at "
                    f"{out[f'{name}_padding_bound']:.2f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
