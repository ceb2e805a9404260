"""Tokenizing the pretraining corpus into shards at two sizes: throughput and peak memory.

    python -m benchmarks.tokenize [--docs 6000] [--scale 10] [--train-docs 6000]

For N and scale × N pretraining documents, in a fresh temporary directory each: the `prepare` stage
writes the embedded corpus (micro experiment otherwise), then the `tokenizer` stage runs twice, on
the Arrow dataset (the default) and streamed (`data.corpus.streaming=true`). The BPE trains on the
same first `--train-docs` documents at both sizes, so only the tokenization grows. The baseline is
what `PretrainData.setup` did before shards: every id in one Python list, then a tensor.

Each run is its own process; its peak RSS is that child's alone (`os.wait4`). Tokens/s is the
stage's own `tokens_per_sec` (tokenize + write, both splits). The last line is JSON, with
`*_rss_ratio` = peak RSS at scale × N / at N for each path (near 1: memory does not grow with the
corpus) and `*_rss_growth_mb` = the difference; most of each process's RSS is its imports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the old in-memory path, timed on the same texts with the tokenizer the stage trained
BASELINE = """
import json, time, torch
from pathlib import Path
from pipeline.data.splits import load_split
from pipeline.data.tokenizer import ChatTokenizer
tok = ChatTokenizer.load("artifacts/tokenizer/tokenizer.json",
                         ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"])
start, n = time.perf_counter(), 0
for split in ("pretrain", "pretrain_val"):
    ids = []
    for doc in tok.encode_batch([r["text"] for r in load_split(Path("data/prepared"), split)]):
        ids.append(tok.bos_id)
        ids.extend(doc)
    stream = torch.tensor(ids, dtype=torch.long)
    n += len(stream)
print(json.dumps({"tokens": n, "tokens_per_sec": n / (time.perf_counter() - start)}))
"""


def child(args: list[str], cwd: Path, log: str) -> tuple[str, float]:
    """Run `python args...` in `cwd`; return its stdout and its own peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (cwd / f"{log}.out").open("w") as out, (cwd / f"{log}.err").open("w") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{(cwd / f'{log}.err').read_text()[-3000:]}")
    return (cwd / f"{log}.out").read_text(), usage.ru_maxrss / 1024  # Linux reports KiB


def measure(docs: int, train_docs: int) -> dict[str, float]:
    overrides = ["experiment=micro", f"data.sizes.pretrain_docs={docs}", "tokenizer.vocab_size=512",
                 f"++tokenizer.train_docs={train_docs}"]
    row: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        work = Path(tmp)
        child(["-m", "pipeline", "stage=prepare", *overrides], work, "prepare")
        for name, streaming in (("shards", "false"), ("stream", "true")):
            _, rss = child(["-m", "pipeline", "stage=tokenizer", *overrides, f"data.corpus.streaming={streaming}"],
                           work, name)
            metrics = json.loads((work / "metrics" / "tokenizer.json").read_text())
            row |= {f"{name}_tok_s": round(metrics["tokens_per_sec"]), f"{name}_rss_mb": round(rss, 1)}
            row["tokens"] = metrics["n_tokens_pretrain"] + metrics["n_tokens_pretrain_val"]
        out, rss = child(["-c", BASELINE], work, "list")
        row |= {"list_tok_s": round(json.loads(out)["tokens_per_sec"]), "list_rss_mb": round(rss, 1)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=6000, help="pretraining documents of the small run (N)")
    parser.add_argument("--scale", type=int, default=10, help="the large run has scale × N documents")
    parser.add_argument("--train-docs", type=int, default=6000, help="tokenizer.train_docs at both sizes")
    args = parser.parse_args()
    sizes = {"small": args.docs, "large": args.docs * args.scale}
    rows = {size: measure(n, args.train_docs) for size, n in sizes.items()}
    result: dict[str, float | int] = {"threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
                                      "train_docs": args.train_docs}
    for size, n in sizes.items():
        r = rows[size]
        print(f"{n} docs, {r['tokens']} tokens: shards {r['shards_tok_s']} tok/s {r['shards_rss_mb']} MB | "
              f"streamed {r['stream_tok_s']} tok/s {r['stream_rss_mb']} MB | "
              f"list (old) {r['list_tok_s']} tok/s {r['list_rss_mb']} MB")
        result |= {f"docs_{size}": n, **{f"{k}_{size}": v for k, v in r.items()}}
    for name in ("shards", "stream", "list"):
        small, large = rows["small"][f"{name}_rss_mb"], rows["large"][f"{name}_rss_mb"]
        result |= {f"{name}_rss_ratio": round(large / small, 2), f"{name}_rss_growth_mb": round(large - small, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
