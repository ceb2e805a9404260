"""The pipeline's KV-cache sampler vs transformers `generate` on the same exported model.

    python -m benchmarks.hf_generate [--batches 1 8] [--new-tokens 128] [--prompt-len 16] [--repeats 3] [--quick]

The model is the CPU demo model's shape (conf/model/tiny.yaml: 4 layers, 4 heads, 128 wide, vocab 512)
with a 512-token context, random weights (speed does not depend on training), exported with
`pipeline.interop.hf.export_model` and loaded back with `AutoModelForCausalLM.from_pretrained`. Both decode
greedily from the same random prompts with no stop token, so both produce the same number of
tokens, and the run checks they produce the *same* tokens. The last line is JSON with tokens/s of
each per batch size and `ratio_b<N>` = pipeline / transformers (goal ≥ 1).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

from pipeline.config.model import GPTConfig
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.interop.hf import export_model, require_transformers
from pipeline.model.gpt import GPT

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]


def best_time(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, list[list[int]]]:
    best, out = float("inf"), []
    for _ in range(repeats):  # best of n: the least disturbed run
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke mode: batch 2, 8 new tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.new_tokens, args.repeats = [2], 8, 1
    transformers = require_transformers()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=512, n_layer=4, n_head=4, n_embd=128)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(models.BPE())  # ids are drawn directly: the tokenizer only carries the special tokens
        tok.add_special_tokens(SPECIALS)
        tok.save(str(Path(tmp) / "tokenizer.json"))
        export_model(model, ChatTokenizer(tok, SPECIALS), Path(tmp) / "tokenizer.json", Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"), local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    result: dict[str, object] = {"model": "tiny shape, block 512", "new_tokens": args.new_tokens,
                                 "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
                                 "transformers": transformers.__version__}
    with torch.inference_mode():
        for batch in args.batches:
            prompts = torch.randint(5, 512, (batch, args.prompt_len), generator=g)
            ours_s, ours = best_time(lambda p=prompts: generate(model, p.tolist(), cfg, stop_id=None, pad_id=0),
                                     args.repeats)
            theirs_s, theirs = best_time(
                lambda p=prompts: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist(),
                args.repeats)
            n = batch * args.new_tokens
            result |= {f"pipeline_tok_s_b{batch}": round(n / ours_s, 1), f"hf_tok_s_b{batch}": round(n / theirs_s, 1),
                       f"ratio_b{batch}": round(theirs_s / ours_s, 2), f"same_tokens_b{batch}": ours == theirs}
            print(f"batch {batch}: pipeline {n / ours_s:.0f} tok/s, transformers {n / theirs_s:.0f} tok/s, "
                  f"ratio {theirs_s / ours_s:.2f}, same tokens: {ours == theirs}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
