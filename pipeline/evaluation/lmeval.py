"""An export through EleutherAI's lm-evaluation-harness, asked exactly as the evaluate stage asks.

lm-eval does the running: its `hf` model loads the export with transformers, renders each question
through the export's own chat template (`apply_chat_template`), generates greedily and aggregates. What
it has no way to know is written here, as an ordinary lm-eval task directory (`gpt_pipeline_eval`), so the
same files also work from lm-eval's own command line:
- the problems: evaluate's (the eval split's first `evaluate.max_problems` rows) as a local JSON Lines file,
  each with the exact question text evaluate puts in the user turn (`evaluate.prompts.zero_shot`);
- the asking: zero-shot, greedy, `evaluate.max_new_tokens` tokens, stopping at the tokenizer's end-of-turn
  token (where evaluate stops);
- the grading: `utils.py` calls the pipeline's own checker (`pipeline.data.tasks.check`), so it needs
  gpt-pipeline installed where lm-eval runs, and the two can never grade differently.

It runs through lm-eval's Python API, not its CLI: in-process it indexes only our task directory (the CLI
indexes lm-eval's ~15,000 bundled tasks first, ~9 s) and hands back the per-problem replies, which the
result file compares with evaluate's per-family numbers. `--write-only` prints the equivalent CLI command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

from pipeline import paths
from pipeline.io import write_json

TASK = "gpt_pipeline_eval"
TASKS_DIR = paths.OUTPUTS / "lm_eval" / "tasks"
RESULTS_FILE = paths.OUTPUTS / "lm_eval" / "results.json"  # outside metrics/: no DVC output is touched
EVALUATE_METRICS = paths.metrics_file("evaluate")
INSTALL = "pip install 'gpt-pipeline[lm-eval]'"
BATCH_SIZE = 32  # problems per generate call: quick on a CPU, and left padding changes no reply

UTILS = '''"""gpt_pipeline_eval's metric: the pipeline's own checker, so a reply is graded exactly as the evaluate
stage grades it (written by pipeline.evaluation.lmeval; needs gpt-pipeline installed)."""
from pipeline.data.tasks import check


def process_results(doc: dict, results: list[str]) -> dict[str, bool]:
    return {"exact_match": check(doc["answer"], results[0])}
'''


def workspace_rows() -> tuple[list[dict], int, str]:
    """(evaluate's problems, each with the `question` evaluate asks; its answer budget; the stop token), from the
    workspace's config (params.yaml, else conf/) and prepared data."""
    from pipeline.config.load import compose, load_params
    from pipeline.config.root import load_config
    from pipeline.data.splits import load_split
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluation.evaluate import templates

    cfg = load_config(load_params() if paths.PARAMS_FILE.is_file() else compose())
    e, tok = cfg.evaluate, load_tokenizer(cfg.tokenizer.special_tokens)
    asked = templates(e)
    rows = [{**row, "question": asked.question(row["prompt"])}
            for row in load_split(paths.PREPARED, "eval")[: e.max_problems]]
    return rows, e.max_new_tokens, tok.tok.id_to_token(tok.end_id)


def task_yaml(data_file: Path, max_new_tokens: int, stop: str) -> str:
    """The task definition (strings JSON-quoted: JSON is YAML); `!function` is lm-eval's tag for a Python hook."""
    q = json.dumps
    return f"""# Written by pipeline.evaluation.lmeval: evaluate's zero-shot exact match; use --apply_chat_template
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {q(str(data_file.resolve()))}
test_split: test
output_type: generate_until
num_fewshot: 0
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: [{q(stop)}]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_new_tokens}
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(directory: Path, rows: list[dict], max_new_tokens: int, stop: str) -> Path:
    """Write the task directory (the YAML, its data file and utils.py); returns the YAML's path. `rows` carry
    `question` (the user turn's text) and `answer`; the data file's path in the YAML is absolute, so the task
    loads from any working directory."""
    directory.mkdir(parents=True, exist_ok=True)
    data_file = directory / f"{TASK}.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (directory / "utils.py").write_text(UTILS)
    config = directory / f"{TASK}.yaml"
    config.write_text(task_yaml(data_file, max_new_tokens, stop))
    return config


def model_args(model_dir: Path) -> dict[str, str | bool]:
    """lm-eval's `hf` model on `model_dir` in fp32, encoding each rendered prompt without the tokenizer's own special
    tokens, as the pipeline and transformers' `apply_chat_template` do: the template writes every one it wants. (By
    default lm-eval lets the tokenizer add its BOS unless the rendered text starts with it: a template that leaves
    BOS out, TinyLlama-Chat's, would be asked with a BOS the pipeline never puts there.)"""
    return {"pretrained": str(model_dir), "dtype": "float32", "add_bos_token": False}


def command_line(model_dir: Path, tasks_dir: Path, limit: int | None, batch_size: int = BATCH_SIZE) -> str:
    """lm-eval's own CLI for the same evaluation."""
    args = ",".join(f"{k}={v}" for k, v in model_args(model_dir).items())
    cmd = ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", TASK, "--include_path", str(tasks_dir),
           "--apply_chat_template", "--device", "cpu", "--batch_size", str(batch_size)]
    return shlex.join(cmd + (["--limit", str(limit)] if limit else []))


def offline() -> None:
    """The pipeline's offline defaults (pipeline.harness.runner), set before transformers or datasets is imported;
    the user's environment wins."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(paths.HF_HOME)),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)


def evaluate_lm(model_dir: Path, tasks_dir: Path, limit: int | None = None, batch_size: int = BATCH_SIZE) -> dict:
    """lm-eval's `simple_evaluate` on `model_dir` with our task only, on the CPU in fp32, samples kept."""
    offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model="hf", model_args=model_args(model_dir), tasks=[TASK], task_manager=tasks,
                                   apply_chat_template=True, device="cpu", batch_size=batch_size, limit=limit,
                                   log_samples=True, bootstrap_iters=0)


def family_means(pairs: list[tuple[str, bool]]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for family, hit in pairs:
        hits[family].append(hit)
    return {f"exact_match/{fam}": round(sum(h) / len(h), 6) for fam, h in sorted(hits.items())}


def summary(out: dict, rows: list[dict], model_dir: Path, evaluate_file: Path = EVALUATE_METRICS) -> dict:
    """What the result file holds: lm-eval's exact match (whole and per family) and, where evaluate scored the same
    checkpoint on the same problems (metrics/evaluate.json, the row of the checkpoint the export holds), its numbers
    and the difference."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    pairs = [(s["doc"]["family"], bool(s["exact_match"])) for s in samples]
    lm = {"exact_match": round(out["results"][TASK]["exact_match,none"], 6), **family_means(pairs)}
    result = {"task": TASK, "model_dir": str(model_dir), "problems": len(samples), "lm_eval": lm}
    provenance = model_dir / "gpt_pipeline.json"
    checkpoint = json.loads(provenance.read_text()) if provenance.is_file() else {}
    name = checkpoint.get("checkpoint")
    table = json.loads(evaluate_file.read_text()) if evaluate_file.is_file() else {}
    if name in table and len(samples) == len(rows):
        row = table[name]
        result["evaluate"] = {"file": str(evaluate_file), "checkpoint": name, "problems": len(rows),
                              "same_run": row.get("run_id") == checkpoint.get("run_id"),
                              **{k: v for k, v in row.items() if k == "exact_match" or k.startswith("exact_match/")}}
        result["difference"] = round(lm["exact_match"] - row["exact_match"], 6)
    else:
        # another checkpoint, no evaluation yet, or --limit: not the same problems
        result["evaluate"] = result["difference"] = None
    result["replies"] = [{"key": s["doc"]["key"], "answer": s["doc"]["answer"], "reply": s["filtered_resps"][0],
                          "exact_match": bool(s["exact_match"])} for s in samples]
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=paths.user_path, default=paths.EXPORT_DIR,
                        help="a transformers directory the export stage or `gpt-pipeline export` wrote")
    parser.add_argument("--tasks-dir", type=paths.user_path, default=TASKS_DIR,
                        help="where the lm-eval task is written")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="problems per generate call")
    parser.add_argument("--out", type=paths.user_path, default=RESULTS_FILE, help="the result JSON")
    parser.add_argument("--write-only", action="store_true",
                        help="write the task directory and print the lm_eval command line, run nothing")


def run(args: argparse.Namespace) -> int:
    """`gpt-pipeline lm-eval`: write the task from the workspace, run lm-eval on the export, write the result."""
    def fail(message: str) -> int:
        print(f"gpt-pipeline lm-eval: {message}", file=sys.stderr)
        return 2

    try:
        rows, max_new_tokens, stop = workspace_rows()
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    config = write_task(args.tasks_dir, rows, max_new_tokens, stop)
    line = command_line(args.model_dir, args.tasks_dir, args.limit, args.batch_size)
    print(f"wrote {config} ({len(rows)} problems); lm-eval's CLI runs it with:\n  {line}")
    if args.write_only:
        return 0
    if not (args.model_dir / "config.json").is_file():
        return fail(f"{args.model_dir} is not a transformers directory (no config.json): run `dvc repro export` "
                    "or `gpt-pipeline export --stage aligned --out DIR` and pass --model-dir DIR")
    try:
        import lm_eval  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return fail(f"{err.name} is not installed: {INSTALL}")
    start = time.perf_counter()
    out = evaluate_lm(args.model_dir, args.tasks_dir, args.limit, args.batch_size)
    result = {**summary(out, rows, args.model_dir), "seconds": round(time.perf_counter() - start, 1),
              "lm_eval_version": version("lm-eval"), "command_line": line}
    write_json(args.out, result)
    compared = (f", evaluate's {result['evaluate']['exact_match']:.4f} (difference {result['difference']:+.4f})"
                if result["evaluate"] else "")
    print(f"lm-eval exact match {result['lm_eval']['exact_match']:.4f} on {result['problems']} problems{compared}; "
          f"wrote {args.out}")
    return 0
