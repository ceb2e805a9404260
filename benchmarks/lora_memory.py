"""Memory of one LoRA SFT step against one full SFT step on the same model, side by side in one process.

    python -m benchmarks.lora_memory [--model gpt_10m] [--batch 8] [--block 256] [--device cpu|cuda] [--quick]

Both paths start from the same seeded GPT (conf/model/<name>.yaml, default gpt_10m: 6 layers x 6 heads x 384,
~11M parameters; vocab 512) and take one SFT step on the same random batch with the pipeline's own pieces:
the SFT loss (`pipeline.training.lm.lm_loss`), AdamW over `param_groups` as `Objective.configure_optimizers`
builds it, and for LoRA conf/peft/lora.yaml (r 8 on every Linear of the blocks: c_attn, c_proj, c_fc) through
`pipeline.model.lora.add_adapters`. A step is forward, backward, `optimizer.step()` (Adam's state is created
there, as in every later step) and `zero_grad(set_to_none=False)`, so the gradients are still held.

What is measured:
- `--device cuda`: `torch.cuda.max_memory_allocated()` over the step (statistics reset before it): the
  allocator's true peak, weights included.
- on CPU, which keeps no allocator statistics, the step's tensors are counted from the tensors themselves:
  weights (every parameter) + gradients (of the trainable parameters) + optimizer state (Adam's two moments)
  + activations (every tensor autograd saves for backward during the forward, once per storage, parameters
  excluded: `torch.autograd.graph.saved_tensors_hooks`). Their sum is what a training step holds at once at
  the start of backward, an upper bound of its peak; kernels' scratch buffers and the allocator's slack,
  which both paths have alike, are not in it.
The last line is JSON: each component per path in MiB, the totals, and `ratio` = LoRA total / full total.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before torch starts its thread pool; importers keep their own setting
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import copy
import json
import time

import torch

from pipeline.config.root import Config
from pipeline.model import lora
from pipeline.model.gpt import GPT
from pipeline.training.lm import lm_loss
from pipeline.training.objective import param_groups

MIB = 2 ** 20


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_step(model: torch.nn.Module, cfg: Config, batch: dict, device: torch.device) -> dict:
    """One SFT step of `model`; the bytes of each part of the step's memory (CPU) or the allocator's peak."""
    o = cfg.sft.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    params = list(model.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:  # a frozen weight autograd keeps is a weight, not activation
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(batch["input_ids"]), batch["labels"])
    loss.backward()
    grads = nbytes(p.grad for p in params if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=False)
    state = nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    out = {"weights": nbytes(params), "grads": grads, "optimizer_state": state, "activations": sum(saved.values())}
    out["total"] = sum(out.values())
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    out["seconds"] = time.perf_counter() - start
    out["params_trainable"] = sum(p.numel() for p in params if p.requires_grad)
    out["params_total"] = sum(p.numel() for p in params)
    out["loss"] = float(loss.detach())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt_10m", help="conf/model/<name>.yaml")
    parser.add_argument("--batch", type=int, default=8, help="sequences in the step")
    parser.add_argument("--block", type=int, default=256, help="tokens per sequence (<= the model's block_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the micro model, batch 2 x 32: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch, args.block = "micro", 2, 32
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from pipeline.config.load import compose  # Hydra: only this benchmark composes conf/
    from pipeline.config.root import load_config
    cfg = load_config(compose(["logger=none", f"model={args.model}", "peft=lora"]))
    device = torch.device(args.device)
    shape = cfg.model.shape(cfg.tokenizer.vocab_size)
    block = min(args.block, shape.block_size)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (args.batch, block + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
    torch.manual_seed(cfg.seed)
    base = GPT(shape)
    runs = {}
    for path in ("full", "lora"):
        model = copy.deepcopy(base)
        model = (lora.add_adapters(model, cfg.peft) if path == "lora" else model).to(device)
        runs[path] = one_step(model, cfg, batch, device)
        del model
        r = runs[path]
        print(f"{path:5s} weights {r['weights'] / MIB:7.1f} MiB  grads {r['grads'] / MIB:7.1f}  optimizer "
              f"{r['optimizer_state'] / MIB:7.1f}  activations {r['activations'] / MIB:7.1f}  total "
              f"{r['total'] / MIB:7.1f} MiB  ({r['params_trainable']:,} of {r['params_total']:,} parameters "
              f"trained, {r['seconds']:.1f} s)", flush=True)
    full, low = runs["full"], runs["lora"]
    key = "cuda_peak" if device.type == "cuda" else "total"
    ratio = low[key] / full[key]
    print(f"LoRA / full ({'allocator peak' if key == 'cuda_peak' else 'weights + grads + optimizer + activations'}):"
          f" {ratio:.3f}")
    p = cfg.peft
    result = {f"{path}_{k}_mib": round(v / MIB, 2) for path, r in runs.items() for k, v in r.items()
              if k in ("weights", "grads", "optimizer_state", "activations", "total", "cuda_peak")}
    print(json.dumps({**result, "ratio": round(ratio, 3), "measure": key,
                      "full_params_trainable": full["params_trainable"],
                      "lora_params_trainable": low["params_trainable"], "params_total": low["params_total"],
                      "model": f"{args.model} ({shape.n_layer}x{shape.n_head}x{shape.n_embd}, "
                               f"vocab {shape.vocab_size})",
                      "batch": args.batch, "block": block, "device": str(device),
                      "lora": {"r": p.r, "alpha": p.alpha, "target_modules": list(p.target_modules)},
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
