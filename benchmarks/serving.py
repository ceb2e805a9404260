"""Serving throughput: the same requests from one client one after another vs from several clients at once.

    python -m benchmarks.serving [--requests 8] [--clients 1 2 4 8] [--max-tokens 48] [--rounds 5]
                                 [--stage aligned] [--model aligned] [--batch-window-ms MS] [--workspace .] [--quick]

Starts `gpt-pipeline serve --stage <stage>` on a workspace's checkpoints (default: this repository's, where the
chain has run; any directory with params.yaml, artifacts/ and data/ will do) in a process of its own on a free
port, then sends `--requests` chat requests (different arithmetic questions, temperature 0, `max_tokens` fixed, no
stop strings) through the official `openai` client. With `c` clients, `c` threads each send their share of the
requests back to back, all starting together; `c` = 1 is the baseline: one client, each request after the last
one's answer. A level's time is from the start to the last answer; rounds alternate the levels (a busy moment of a
shared machine hits all alike) and medians are compared. Generated tokens are counted from each response's
`usage.completion_tokens`: the end token may stop a reply before `max_tokens`; `--model pretrain` (served by the
same server; the pretrained checkpoint does not write the end token) makes every reply run to `max_tokens`.

The server's /health says how many waves the engine decoded and the widest one: `waves` per round at each level
shows whether concurrent requests were batched together. The last line is JSON: requests/s and tokens/s per level
and `ratio_req_s_<c>` / `ratio_tok_s_<c>` = level c ÷ one client. Set OMP_NUM_THREADS (default 1 here): the server
inherits it.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [f"What is {a} + {b}?" for a, b in ((12, 35), (47, 8), (3, 64), (25, 25), (71, 19), (9, 90), (56, 33),
                                                  (18, 4), (30, 61), (44, 45), (2, 87), (66, 13), (5, 5), (80, 11),
                                                  (39, 27), (14, 72))]


class Served:
    """`gpt-pipeline serve` on `workspace` in a process of its own, on a free local port (a context manager)."""

    def __init__(self, workspace: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.workspace, self.args = workspace, args
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serving-bench-", suffix=".log")

    def __enter__(self) -> Served:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port),
                                      *self.args], cwd=self.workspace, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"gpt-pipeline serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise SystemExit(f"gpt-pipeline serve did not answer /health in 120 s:\n{self.tail()}")

    def __exit__(self, *_) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.load(r)

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> int:
    """One chat request; its completion tokens."""
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=max_tokens, seed=0)
    return r.usage.completion_tokens


def level(server: Served, clients: list[openai.OpenAI], model: str, questions: list[str],
          max_tokens: int) -> dict:
    """All `questions` sent by len(clients) threads at once, each its share back to back: seconds, tokens, waves."""
    shares = [questions[i::len(clients)] for i in range(len(clients))]
    tokens = [0] * len(clients)
    errors: list[Exception] = []
    start = threading.Barrier(len(clients) + 1)

    def client_main(i: int) -> None:
        start.wait()
        try:
            tokens[i] = sum(ask(clients[i], model, q, max_tokens) for q in shares[i])
        except Exception as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client_main, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    waves = server.health()["waves"]
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    if errors:
        raise SystemExit(f"a request failed: {errors[0]!r}\n{server.tail()}")
    return {"seconds": took, "tokens": sum(tokens), "waves": server.health()["waves"] - waves}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrency levels; 1 is the baseline")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stage", default="aligned", help="the server's default checkpoint (`serve --stage`)")
    p.add_argument("--model", default=None, help="the checkpoint asked for (default: --stage)")
    p.add_argument("--batch-window-ms", type=float, default=None, help="passed to `serve` (default: its own)")
    p.add_argument("--workspace", type=Path, default=REPO, help="where to run `serve` (default: this repository)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 requests, 1 and 2 clients, 4 tokens, 1 round")
    args = p.parse_args()
    if args.quick:
        args.requests, args.clients, args.max_tokens, args.rounds = 2, [1, 2], 4, 1
    levels = sorted({1, *args.clients})
    if args.requests > len(QUESTIONS) or max(levels) > args.requests:
        p.error(f"at most {len(QUESTIONS)} requests, and no more clients than requests")
    model = args.model or args.stage
    questions = QUESTIONS[:args.requests]
    extra = [] if args.batch_window_ms is None else ["--batch-window-ms", str(args.batch_window_ms)]
    with Served(args.workspace, "--stage", args.stage, *extra) as server:
        clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
                   for _ in range(max(levels))]
        for c in clients:  # warm-up: each client's connection, the model's first use
            ask(c, model, questions[0], args.max_tokens)
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                runs[c].append(level(server, clients[:c], model, questions, args.max_tokens))
        widest = server.health()["widest_wave"]
    result: dict[str, object] = {"stage": args.stage, "model": model, "requests": args.requests,
                                 "max_tokens": args.max_tokens, "rounds": args.rounds,
                                 "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                                 "batch_window_ms": args.batch_window_ms, "widest_wave": widest}
    base_req = base_tok = 0.0
    for c in levels:
        seconds = statistics.median(r["seconds"] for r in runs[c])
        tokens = statistics.median(r["tokens"] for r in runs[c])
        req_s, tok_s = args.requests / seconds, tokens / seconds
        if c == 1:
            base_req, base_tok = req_s, tok_s
        waves = statistics.median(r["waves"] for r in runs[c])
        result |= {f"req_s_{c}": round(req_s, 2), f"tok_s_{c}": round(tok_s, 1), f"tokens_{c}": tokens,
                   f"waves_{c}": waves, f"ratio_req_s_{c}": round(req_s / base_req, 2),
                   f"ratio_tok_s_{c}": round(tok_s / base_tok, 2)}
        print(f"{c} client{'s' if c > 1 else ' '}: {req_s:6.2f} req/s {tok_s:7.1f} tok/s ({tokens:.0f} tokens, "
              f"{waves:.0f} waves)  ratio {req_s / base_req:.2f} req/s, {tok_s / base_tok:.2f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
