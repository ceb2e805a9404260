"""The pipeline's GPT against transformers' `LlamaForCausalLM` on the same weights: forward and training step.

    python -m benchmarks.hf_llama [--batch 8] [--seq 256] [--repeats 5] [--quick]

A random `LlamaForCausalLM` (4 layers, 256 wide, 8 query and 2 key/value heads, SwiGLU 704, vocab 4096,
untied head: the Llama family's switches at a size a 2-core CPU runs in seconds) is saved with
`save_pretrained` and imported with `model.init_from`'s code path (`pipeline.interop.hf`), so both models hold
the same weights; the run checks their logits agree. Each measurement alternates the two models, `--repeats`
times, and keeps each one's best time (the least disturbed run):
- forward: logits of a (batch, seq) batch under inference mode;
- train step: forward, cross-entropy on the next token, backward and an AdamW step (fp32).
transformers runs its default attention (SDPA). The last line is JSON with tokens/s of each and
`ratio_forward`, `ratio_train` = pipeline / transformers (goal ≥ 1.0 on CPU).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config.model import ModelConfig
from pipeline.interop.hf import load_pretrained, pretrained_shape, require_transformers
from pipeline.model.gpt import GPT


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best time of each, measured alternately after one warm-up call of each."""
    ours(), theirs()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        best[0] = min(best[0], timed(ours))
        best[1] = min(best[1], timed(theirs))
    return best[0], best[1]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, logits_of) -> None:
    logits = logits_of(model, ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke mode: batch 2, seq 32, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 32, 1
    transformers = require_transformers()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        shape = pretrained_shape(ModelConfig(init_from=f"hf:{tmp}", block_size=512), config.vocab_size, Path(tmp))
        model = load_pretrained(GPT(shape), Path(tmp))
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    ours_logits = lambda m, x: m(x)
    theirs_logits = lambda m, x: m(input_ids=x).logits
    with torch.inference_mode():
        hf.eval(), model.eval()
        gap = (ours_logits(model, ids) - theirs_logits(hf, ids)).abs().max().item()
        fwd = side_by_side(lambda: ours_logits(model, ids[:, :-1]), lambda: theirs_logits(hf, ids[:, :-1]),
                           args.repeats)
    hf.train(), model.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (model, hf)]
    step = side_by_side(lambda: train_step(model, opts[0], ids, ours_logits),
                        lambda: train_step(hf, opts[1], ids, theirs_logits), args.repeats)
    n = args.batch * args.seq
    result = {"model": "Llama 4x256, 8/2 heads, vocab 4096", "batch": args.batch, "seq": args.seq,
              "threads": torch.get_num_threads(), "transformers": transformers.__version__,
              "max_logit_gap": gap, "params": sum(p.numel() for p in model.parameters()),
              "pipeline_forward_tok_s": round(n / fwd[0]), "hf_forward_tok_s": round(n / fwd[1]),
              "ratio_forward": round(fwd[1] / fwd[0], 2),
              "pipeline_train_tok_s": round(n / step[0]), "hf_train_tok_s": round(n / step[1]),
              "ratio_train": round(step[1] / step[0], 2)}
    print(f"forward: pipeline {n / fwd[0]:.0f} tok/s, transformers {n / fwd[1]:.0f} tok/s, ratio {fwd[1] / fwd[0]:.2f}")
    print(f"train step: pipeline {n / step[0]:.0f} tok/s, transformers {n / step[1]:.0f} tok/s, "
          f"ratio {step[1] / step[0]:.2f}; max logit gap {gap:.1e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
