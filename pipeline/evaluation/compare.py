"""Alignment methods side by side: one row per DVC experiment, judged by the same verdict against the same SFT
model and the same-compute control.

A comparison is a queue of experiments that differ in `align` only, so DVC's run cache serves data, tokenizer,
pretraining, SFT and the reward model to every one of them, and each reruns align, sft_control and evaluate:

    python -m pipeline.evaluation.compare queue ppo grpo rloo dpo dpo,loss_type=ipo kto orpo
    dvc queue start -j 1          # one at a time: each trains on every core (dvc queue status: how far)
    python -m pipeline.evaluation.compare table [--markdown docs/comparison.md]

`queue` is `dvc exp run --queue -S align=<method> [-S align.<key>=<value> ...] -n cmp-<label>` for each
method (a method with settings is written `name,key=value,...`; `dvc exp remove` an earlier comparison's
experiments first: DVC refuses a name twice); `table` reads `dvc exp show --json` and lists,
per experiment, the aligned checkpoint's exact match, its margin over SFT and over the control, the KL to SFT,
the reward model's score, the verdict's and the live monitor's reward-hacking flags, the monitor's best exact
match and its step, the policy updates and align's wall time, the highest exact match first. DVC computes none
of this; it stores each experiment's metrics, which this reads.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable

PREFIX = "cmp-"  # the queued experiments' names
COLUMNS = (("experiment", "experiment"), ("method", "method"), ("exact_match", "exact match"),
           ("vs_sft", "vs SFT"), ("vs_control", "vs control"), ("beats_control", "beats control"),
           ("kl_to_sft", "KL to SFT"), ("reward", "RM score"), ("reward_hacking", "hacking (verdict)"),
           ("live_hacking", "hacking (live)"), ("best", "best evaluation (step)"), ("policy_updates", "policy updates"),
           ("align_s", "align s"))


def queue_args(spec: str) -> tuple[str, list[str]]:
    """`name[,key=value...]` -> (the experiment's name, the `-S` overrides)."""
    name, *settings = spec.split(",")
    bad = [s for s in settings if "=" not in s]
    if not name or bad:
        raise SystemExit(f"compare queue: {spec!r} is not name[,key=value...] (for example dpo,loss_type=ipo)")
    label = name + "".join(f"-{s.split('=', 1)[1]}" for s in settings)
    overrides = ["-S", f"align={name}"] + [arg for s in settings for arg in ("-S", f"align.{s}")]
    return PREFIX + label.replace(".", "_"), overrides


def experiments(shown: list[dict], prefix: str = PREFIX) -> Iterable[tuple[str, dict]]:
    """(name, data) of every experiment in `dvc exp show --json` output whose name starts with `prefix`."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name") or ""
            if name.startswith(prefix) and rev.get("data"):
                yield name, rev["data"]


def row(name: str, data: dict) -> dict | None:
    """One experiment's comparison row; None while its metrics are incomplete (queued, failed)."""
    metrics = {path: (value or {}).get("data") or {} for path, value in (data.get("metrics") or {}).items()}
    evaluated, align = metrics.get("metrics/evaluate.json", {}), metrics.get("metrics/align.json", {})
    verdict, aligned = evaluated.get("verdict"), evaluated.get("aligned")
    if not verdict or not aligned or not align:
        return None
    return {"experiment": name.removeprefix(PREFIX), "method": verdict["method"],
            "exact_match": aligned["exact_match"], "vs_sft": verdict["exact_match_vs_sft"],
            "vs_control": verdict["exact_match_vs_control"], "beats_control": verdict["beats_control"],
            "kl_to_sft": aligned["kl_to_sft"], "reward": aligned["reward"],
            "reward_hacking": verdict["reward_hacking"], "live_hacking": align.get("eval/reward_hacking"),
            "best": (f"{align['best_exact_match']:.3f} ({align['best_step']})" if "best_exact_match" in align
                     else None),
            "policy_updates": align["policy_updates"], "align_s": align.get("wall_time_s")}


SIGNED = ("vs_sft", "vs_control")  # margins: shown with their sign


def cell(key: str, value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.3f}" if key in SIGNED else f"{value:.3f}" if key != "align_s" else f"{value:.0f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(key, r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation.compare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue one DVC experiment per alignment method")
    q.add_argument("methods", nargs="+", help="name[,key=value...], e.g. ppo grpo dpo,loss_type=ipo")
    t = sub.add_parser("table", help="the comparison of the finished experiments")
    t.add_argument("--json", help="read this `dvc exp show --json` output instead of running it")
    t.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.command == "queue":
        for spec in args.methods:
            name, overrides = queue_args(spec)
            proc = dvc("exp", "run", "--queue", *overrides, "-n", name)
            if proc.returncode:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return proc.returncode
            print(f"queued {name}: dvc exp run {' '.join(overrides)}")
        print("now: dvc queue start -j 1, then python -m pipeline.evaluation.compare table")
        return 0
    if args.json:
        shown = json.loads(open(args.json, encoding="utf-8").read())
    else:
        proc = dvc("exp", "show", "--json")
        if proc.returncode:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return proc.returncode
        shown = json.loads(proc.stdout)
    rows = sorted((r for name, data in experiments(shown) if (r := row(name, data)) is not None),
                  key=lambda r: (-r["exact_match"], r["experiment"]))  # the best first
    if not rows:
        print(f"no finished experiment named {PREFIX}*: queue some first (python -m pipeline.evaluation.compare "
              "queue ppo dpo ...; dvc queue start)", file=sys.stderr)
        return 1
    text = markdown(rows)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
