"""The pipeline's Lightning training step vs a plain PyTorch loop, side by side in one process.

    python -m benchmarks.train_step [--rounds 5] [--warmup 5] [--steps 20] [--batch 16] [--quick]
    python -m benchmarks.train_step --breakdown --model micro --batch 1 --steps 100   # where the time goes

Both paths train the CPU demo model (conf/model/tiny.yaml, vocab 512 = tokenizer.vocab_size padded
to 64) from the same seed on the same pre-generated random batches, fp32, one thread:
  pipeline  `LanguageModeling` + `pipeline.training.trainer.build_trainer` (conf/ composed with logger=none, the
            `CurveRecorder` that `fit` attaches, no validation), then `trainer.fit`;
  plain     a for loop: forward, cross-entropy, backward, clip, AdamW (same param groups), LR
            schedule step, zero_grad(set_to_none=True).
A run times the steps after `--warmup`, each from its start to the next step's start, so everything
between two steps (hooks, logging, progress bar, data fetch) counts. Rounds alternate pipeline,
plain, pipeline, ...; medians are compared. Both runs end at the same loss (the same work). The last
line is JSON: `ratio` = pipeline tokens/s ÷ plain tokens/s by the wall clock, and `cpu_ratio` the
same by this process's CPU time, which other jobs on a shared machine disturb much less.

`--breakdown` runs the pipeline with one piece removed at a time (progress bar, `self.log` in
training_step, CurveRecorder, all three) and reports, for each, the CPU ms per step of its least
disturbed round and the excess over the plain loop; a small model and batch make these fixed
per-step costs stand out.

`StepTimer`, `pipeline_run`, `plain_run` and `random_batches` are shared with benchmarks/gpu_pretrain.py.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before torch starts its thread pool; importers keep their own setting
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import gc
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ProgressBar
from torch.utils.data import DataLoader

from pipeline.config.model import GPTConfig
from pipeline.config.root import Config
from pipeline.model.gpt import GPT
from pipeline.training.curves import CurveRecorder
from pipeline.training.lm import LanguageModeling
from pipeline.training.objective import lr_lambda, param_groups
from pipeline.training.trainer import build_trainer


def quiet_lightning() -> None:
    """Lightning's per-fit banners and hints would bury the results."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*but have no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message)


def random_batches(n: int, batch: int, block: int, vocab: int, seed: int = 0,
                   device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """`n` batches of random tokens shaped like pretraining's: labels are the inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab, (batch, block + 1), generator=g)
        out.append({"input_ids": tok[:, :-1].contiguous().to(device), "labels": tok[:, 1:].contiguous().to(device)})
    return out


class StepTimer(Callback):
    """Wall clock and process CPU time at the start of every training step, and the last step's loss.

    `sync` (e.g. torch.cuda.synchronize) runs before the first timed step and before the closing
    tick only: in between the CPU may queue work ahead of the device, as it would in training.
    """

    def __init__(self, warmup: int, n_steps: int, sync: Callable[[], None] | None = None) -> None:
        self.warmup, self.n_steps, self.sync = warmup, n_steps, sync
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loss = float("nan")

    def tick(self) -> None:
        if self.sync and len(self.wall) in (self.warmup, self.n_steps - 1):
            self.sync()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tick()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.n_steps - 1:
            self.loss = float(outputs["loss"])

    def seconds_per_step(self, clock: str = "wall") -> float:
        """Mean over steps warmup .. n-2, each from its start to the next one's (the last step only
        closes the clock)."""
        t = self.wall if clock == "wall" else self.cpu
        return (t[-1] - t[self.warmup]) / (len(t) - 1 - self.warmup)


def pipeline_run(cfg: Config, model: GPT, batches: list[dict], warmup: int,
                 sync: Callable[[], None] | None = None, *,
                 module_cls: type[LanguageModeling] = LanguageModeling, progress_bar: bool = True,
                 curves: bool = True) -> StepTimer:
    """Train through LanguageModeling + build_trainer for len(batches) steps (the knobs are for --breakdown)."""
    p = cfg.pretrain
    module = module_cls(model, p.optim, len(batches))
    if cfg.strategy.name == "fsdp2":  # what `fit` sets: shard each block (the model is compiled already)
        module.fsdp2 = {"compile": False, "compile_mode": None, "reshard_after_forward": True}
    timer = StepTimer(warmup, len(batches), sync)
    callbacks = [CurveRecorder("bench")] if curves else []  # what `fit` attaches; never written here
    trainer = build_trainer(cfg, "bench", max_steps=len(batches), val_batches=0, grad_clip=p.grad_clip,
                            callbacks=callbacks + [timer])
    if not progress_bar:
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer


def plain_run(cfg: Config, model: GPT, batches: list[dict], warmup: int,
              sync: Callable[[], None] | None = None, *, autocast: torch.dtype | None = None,
              fused: bool = False) -> StepTimer:
    """The same steps as a nanoGPT-style loop."""
    o = cfg.pretrain.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, len(batches), o.min_lr_ratio))
    ctx = torch.autocast(batches[0]["input_ids"].device.type, dtype=autocast) if autocast else nullcontext()
    timer = StepTimer(warmup, len(batches), sync)
    model.train()
    for batch in batches:
        timer.tick()
        with ctx:
            logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    timer.loss = float(loss.detach())
    return timer


def model_config(cfg: Config) -> GPTConfig:
    """The `model` group's shape for the configured tokenizer's vocabulary (padded as pretraining pads it)."""
    return cfg.model.shape(cfg.tokenizer.vocab_size)


def describe(c: GPTConfig, name: str) -> str:
    return f"{name} ({c.n_layer}x{c.n_head}x{c.n_embd}, block {c.block_size}, vocab {c.vocab_size})"


class UnloggedLM(LanguageModeling):
    """LanguageModeling whose training_step logs nothing (no loss, lr or tokens/s): for --breakdown."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step_loss(batch)


BREAKDOWN: dict[str, dict] = {
    "pipeline": {},
    "no progress bar": {"progress_bar": False},
    "no self.log": {"module_cls": UnloggedLM},
    "no CurveRecorder": {"curves": False},
    "bare Lightning": {"progress_bar": False, "module_cls": UnloggedLM, "curves": False},
}


def compare(cfg: Config, gpt_cfg: GPTConfig, batches: list[dict], args) -> dict:
    runs: dict[str, list[StepTimer]] = {"pipeline": [], "plain": []}
    tokens = batches[0]["labels"].numel()
    for r in range(args.rounds):
        for path, run in (("pipeline", pipeline_run), ("plain", plain_run)):
            gc.collect()  # earlier runs' trainers would otherwise be collected inside a timed step
            torch.manual_seed(cfg.seed)
            t = run(cfg, GPT(gpt_cfg), batches, args.warmup)
            runs[path].append(t)
            print(f"round {r + 1}/{args.rounds} {path:8s} {tokens / t.seconds_per_step():8.0f} tokens/s "
                  f"(CPU time: {tokens / t.seconds_per_step('cpu'):6.0f})  last loss {t.loss:.4f}",
                  flush=True)

    def median_tps(path: str, clock: str) -> float:
        return statistics.median(tokens / t.seconds_per_step(clock) for t in runs[path])

    pipe, plain = median_tps("pipeline", "wall"), median_tps("plain", "wall")
    cpu_ratio = median_tps("pipeline", "cpu") / median_tps("plain", "cpu")
    print(f"median: pipeline {pipe:.0f} tokens/s, plain {plain:.0f} tokens/s, ratio {pipe / plain:.3f} "
          f"(by CPU time {cpu_ratio:.3f})")
    return {"pipeline_tokens_per_sec": round(pipe, 1), "plain_tokens_per_sec": round(plain, 1),
            "ratio": round(pipe / plain, 3), "cpu_ratio": round(cpu_ratio, 3),
            "pipeline_runs": [round(tokens / t.seconds_per_step()) for t in runs["pipeline"]],
            "plain_runs": [round(tokens / t.seconds_per_step()) for t in runs["plain"]],
            "pipeline_last_loss": round(runs["pipeline"][-1].loss, 5),
            "plain_last_loss": round(runs["plain"][-1].loss, 5)}


def breakdown(cfg: Config, gpt_cfg: GPTConfig, batches: list[dict], args) -> dict:
    variants = {**{name: lambda m, b, w, kw=kw: pipeline_run(cfg, m, b, w, **kw) for name, kw in BREAKDOWN.items()},
                "plain": lambda m, b, w: plain_run(cfg, m, b, w)}
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            gc.collect()
            torch.manual_seed(cfg.seed)
            ms[name].append(1000 * run(GPT(gpt_cfg), batches, args.warmup).seconds_per_step("cpu"))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ms.items()), flush=True)
    best = {name: min(v) for name, v in ms.items()}  # the least disturbed run: other jobs only add time
    for name, v in best.items():
        print(f"{name:18s} {v:7.2f} CPU ms/step  {v - best['plain']:+6.2f} over plain  "
              f"{(v - best['plain']) / best['plain']:+6.1%}")
    return {"cpu_ms_per_step": {k: round(v, 3) for k, v in best.items()},
            "over_plain_ms": {k: round(v - best["plain"], 3) for k, v in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each path, interleaved")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="tiny", help="conf/model/<name>.yaml (micro makes --breakdown sharper)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps at batch 4: a smoke test")
    parser.add_argument("--breakdown", action="store_true", help="cost of each pipeline piece, in CPU ms/step")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.steps, args.batch = 2, 1, 3, 4
    torch.set_num_threads(1)
    quiet_lightning()
    from pipeline.config.load import compose  # Hydra: only this CPU benchmark composes conf/
    from pipeline.config.root import load_config
    cfg = load_config(compose(["logger=none", f"model={args.model}"]))
    gpt_cfg = model_config(cfg)
    batches = random_batches(args.warmup + args.steps + 1, args.batch, gpt_cfg.block_size, gpt_cfg.vocab_size)
    result = (breakdown if args.breakdown else compare)(cfg, gpt_cfg, batches, args)
    print(json.dumps({**result, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                      "model": describe(gpt_cfg, args.model), "batch": args.batch, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
