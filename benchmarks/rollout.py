"""Rollout throughput of the online methods (PPO, GRPO) at world size 1 and 2, side by side in one run.

    python -m benchmarks.rollout [--prompts 64] [--new-tokens 32] [--rounds 3] [--device cpu|cuda] [--quick]

One global rollout batch of `--prompts` prompts is sampled with `pipeline.alignment.rollout.sample_rollout`
(the KV-cache sampler, then the sampling log-probs, as every PPO/GRPO iteration does), by one process and by two
processes (gloo on CPU, nccl on CUDA; forked, so the model is the same), each taking half, as
`pipeline.data.datamodules.PromptData` splits it. Rounds alternate 1, 2, 1, 2, ...; a round's time is from a
barrier before sampling to the slowest rank's end. The model has the CPU demo model's shape
(conf/model/tiny.yaml) with random weights, so responses run to `--new-tokens` (no end token is likely): the
same work per sample either way. The last line is JSON: samples/s at each world size and `speedup` (world 2 ÷
world 1). On a CPU the two processes share the machine's cores: set OMP_NUM_THREADS to cores / 2 so each
world size gets the same cores.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import socket
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.alignment.methods.grpo import Config as GRPOConfig
from pipeline.alignment.rollout import sample_rollout
from pipeline.config.model import GPTConfig
from pipeline.model.gpt import GPT

END, PAD = 1, 0


class Tokens(SimpleNamespace):
    """The three things `sample_rollout` asks of a tokenizer, for random prompts of token ids."""

    end_id, pad_id = END, PAD

    @staticmethod
    def prompt(ids: list[int]) -> list[int]:
        return ids


def model(device: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    return GPT(cfg).to(device).eval()


def prompts(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"prompt": torch.randint(2, 512, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def timed(policy: GPT, rows: list[dict], cfg: GRPOConfig, device: str, seed: int) -> float:
    g = torch.Generator(device=device).manual_seed(seed)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    sample_rollout(policy, Tokens(), rows, cfg, g, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    took = torch.tensor(time.perf_counter() - start)
    if dist.is_initialized():
        dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the iteration waits for its slowest rank
    return float(took)


def rank_main(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=2)
    rows = prompts(args.prompts)
    share = rows[rank * len(rows) // 2:(rank + 1) * len(rows) // 2]
    policy, cfg = model(device), config(args)
    timed(policy, share[:2], cfg, device, 0)  # warm-up
    times = [timed(policy, share, cfg, device, r) for r in range(args.rounds)]
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def config(args: argparse.Namespace) -> GRPOConfig:
    return GRPOConfig.parse({"method": "grpo", "steps": 1, "optim": {"lr": 1e-5}, "rollout_batch": args.prompts,
                             "group_size": 2, "minibatch_size": args.prompts, "max_new_tokens": args.new_tokens})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 prompts, 4 tokens, 1 round")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 8, 4, 1
    device = "cuda:0" if args.device == "cuda" else "cpu"
    policy, cfg, rows = model(device), config(args), prompts(args.prompts)
    timed(policy, rows[:2], cfg, device, 0)
    one, two = [], []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate, so a busy moment of a shared machine hits both
            one.append(timed(policy, rows, cfg, device, r))
            out = os.path.join(tmp, f"two-{r}.pt")
            single = argparse.Namespace(**{**vars(args), "rounds": 1})
            mp.start_processes(rank_main, args=(port + r + 1, single, out), nprocs=2, join=True,
                               start_method="spawn" if args.device == "cuda" else "fork")
            two.append(torch.load(out, weights_only=True)[0])
    w1, w2 = args.prompts / statistics.median(one), args.prompts / statistics.median(two)
    print(f"world 1: {w1:.1f} samples/s   world 2: {w2:.1f} samples/s   speedup {w2 / w1:.2f}")
    print(json.dumps({"device": args.device, "prompts": args.prompts, "new_tokens": args.new_tokens,
                      "threads_per_process": torch.get_num_threads(), "world1_samples_s": round(w1, 2),
                      "world2_samples_s": round(w2, 2), "speedup": round(w2 / w1, 3)}))


if __name__ == "__main__":
    main()
