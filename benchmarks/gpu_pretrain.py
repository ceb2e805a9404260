"""GPT-2 small pretraining speed on one GPU: the pipeline's Lightning path beside a plain nanoGPT loop.

    python -m benchmarks.gpu_pretrain [--batch-sizes 12 32] [--steps 30] [--warmup 10] [--no-compile]
                                      [--paths pipeline plain] [--strategies auto ddp fsdp fsdp2]
    python -m benchmarks.gpu_pretrain --device cpu --model micro --steps 3      # CPU smoke run

The model is conf/model/<--model>.yaml (default gpt2_124m: 12 layers x 12 heads x 768, T = 1024) with
a 50304-token vocabulary (GPT-2's 50257 padded to 64; there is no tokenizer here, the tokens are
random). On CUDA: bf16-mixed, TF32 for leftover fp32 matmuls, `model.compile()` before training.
  pipeline  LanguageModeling + pipeline.training.trainer.build_trainer (trainer=gpu with devices=1, the
            strategy's conf/strategy/<name>.yaml, logger none, CurveRecorder attached as `fit` does);
  plain     nanoGPT's loop: bf16 autocast, fused AdamW (same param groups and LR schedule),
            gradient clipping, zero_grad(set_to_none=True).
Both see the same pre-generated batches (already on the device) from the same seed. Each run
times the steps after `--warmup` (compilation happens there), from one step's start to the
next's, with a device sync only at the two ends. MFU = model.flops_per_token() x tokens/s ÷ the
device's peak (pipeline.training.hardware.peak_flops, Lightning's device table: 989 TFLOP/s bf16 on an
H100 SXM; null on CPU). Every
strategy (devices=1) runs the pipeline path at every batch size; the plain loop runs once per batch
size. The last line is JSON with every run and `ratios` = pipeline (auto) ÷ plain tokens/s per batch.

Needs omegaconf and pydantic but not hydra-core: the config is read from the conf/*.yaml files with
OmegaConf.load, not composed by Hydra, then checked by the pipeline's schemas (pydantic). On a machine
without them, `pip install omegaconf pydantic`, or (offline) carry their wheels.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.train_step import (
    StepTimer,
    describe,
    model_config,
    pipeline_run,
    plain_run,
    quiet_lightning,
    random_batches,
)
from pipeline.config.root import Config, load_config
from pipeline.model.gpt import GPT
from pipeline.training.hardware import device_name, peak_flops

CONF = Path(__file__).resolve().parent.parent / "conf"


def bench_config(model: str, vocab: int, device: str, precision: str, strategy: str) -> Config:
    """conf/ put together by hand for one device and no logger (each group's file, as the defaults list
    would pick it), checked like any config."""
    base = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    base.pop("defaults"), base.pop("hydra")
    groups = {"model": f"model/{model}", "data": "data/default", "align": "align/ppo", "logger": "logger/none",
              "trainer": f"trainer/{'gpu' if device == 'cuda' else 'cpu'}", "strategy": f"strategy/{strategy}"}
    cfg = {**base, **{g: OmegaConf.to_container(OmegaConf.load(CONF / f"{f}.yaml")) for g, f in groups.items()}}
    cfg["tokenizer"]["vocab_size"] = vocab
    cfg["trainer"] |= {"devices": 1, "precision": precision}
    return load_config(cfg)


def one_run(path: str, strategy: str, batch: int, args) -> dict:
    cfg = bench_config(args.model, args.vocab, args.device, args.precision, "auto" if path == "plain" else strategy)
    gpt_cfg = model_config(cfg)
    batches = random_batches(args.warmup + args.steps + 1, batch, gpt_cfg.block_size, gpt_cfg.vocab_size,
                             device=args.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_cfg).to(args.device)
    if args.compile:
        model.compile()
    if path == "pipeline":
        timer: StepTimer = pipeline_run(cfg, model, batches, args.warmup, sync)
    else:
        bf16 = args.precision.startswith("bf16")
        timer = plain_run(cfg, model, batches, args.warmup, sync, autocast=torch.bfloat16 if bf16 else None, fused=cuda)
    sec = timer.seconds_per_step()
    tps = batch * gpt_cfg.block_size / sec
    peak = peak_flops(args.device, args.precision)
    mfu = model.flops_per_token() * tps / peak if peak else None
    return {"path": path, "strategy": strategy, "batch": batch, "ms_per_iter": round(1000 * sec, 2),
            "tokens_per_sec": round(tps, 1), "mfu": round(mfu, 4) if mfu is not None else None,
            "last_loss": round(timer.loss, 4), "flops_per_token": model.flops_per_token()}


def release(device: str) -> None:
    """Between runs: drop compiled graphs (each run compiles for its own static shapes), the process
    group a ddp/fsdp run left behind, and cached device memory."""
    torch._dynamo.reset()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="gpt2_124m", help="conf/model/<name>.yaml")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size (random tokens below it)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="model.compile() before training (default: on for CUDA, off on CPU)")
    parser.add_argument("--precision", choices=("bf16-mixed", "32-true"), default=None,
                        help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--paths", nargs="+", choices=("pipeline", "plain"), default=["pipeline", "plain"])
    parser.add_argument("--strategies", nargs="+", choices=("auto", "ddp", "fsdp", "fsdp2"), default=["auto"],
                        help="Lightning strategies (devices=1) for the pipeline path")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (the smoke mode: --device cpu --model micro --steps 3)")
    args.warmup = (10 if cuda else 1) if args.warmup is None else args.warmup
    args.compile = cuda if args.compile is None else args.compile
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if cuda:
        torch.set_float32_matmul_precision("high")  # both paths: TF32 for what autocast leaves in fp32
    quiet_lightning()

    plan = [(path, strategy, b) for b in args.batch_sizes
            for path, strategy in [("pipeline", s) for s in args.strategies] + [("plain", "-")] if path in args.paths]
    runs = []
    for path, strategy, batch in plan:
        try:
            r = one_run(path, strategy, batch, args)
            mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
            print(f"batch {batch:3d} {path:8s} {strategy:5s} {r['ms_per_iter']:8.1f} ms/iter "
                  f"{r['tokens_per_sec']:11,.0f} tokens/s  {mfu}", flush=True)
        except Exception as err:  # report the failure, keep measuring the rest
            r = {"path": path, "strategy": strategy, "batch": batch, "error": f"{type(err).__name__}: {err}"}
            print(f"batch {batch:3d} {path:8s} {strategy:5s} FAILED {r['error']}", flush=True)
        runs.append(r)
        release(args.device)

    ratios = {}
    for b in args.batch_sizes:
        tps = {r["path"]: r.get("tokens_per_sec") for r in runs if r["batch"] == b and r["strategy"] in ("auto", "-")}
        if tps.get("pipeline") and tps.get("plain"):
            ratios[str(b)] = round(tps["pipeline"] / tps["plain"], 3)
            print(f"batch {b}: pipeline / plain = {ratios[str(b)]:.3f}")
    cfg = bench_config(args.model, args.vocab, args.device, args.precision, "auto")
    peak = peak_flops(args.device, args.precision)
    print(json.dumps({"device": device_name(args.device), "model": describe(model_config(cfg), args.model),
                      "precision": args.precision, "compile": args.compile, "warmup": args.warmup, "steps": args.steps,
                      "peak_tflops": peak / 1e12 if peak else None, "torch": torch.__version__,
                      "runs": runs, "ratios": ratios}))
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
