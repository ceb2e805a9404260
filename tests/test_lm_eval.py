"""EleutherAI's lm-evaluation-harness on an export (pipeline.evaluation.lmeval): the task it writes loads with lm-eval's
own loader, and lm-eval's greedy replies and exact match on an exported model are the evaluate stage's, reply for
reply, on the same problems."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation import lmeval

from conftest import seeded_workspace

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

# the workspace's evaluate config: every eval problem of the micro data, a template that is not the bare question (so
# a task that asks the raw prompt fails), and room for replies that stop at the end token and replies that do not
OVERRIDES = ["trainer.progress_bar=false", "evaluate.max_problems=40", "evaluate.max_new_tokens=8",
             "evaluate.prompts.zero_shot='Question: {question}'"]


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    lmeval.add_arguments(parser)
    return lmeval.run(parser.parse_args(list(argv)))


def chatty_model(cfg, tok):
    """A seeded micro GPT whose greedy replies differ from prompt to prompt (block weights of std 0.2: at the default
    init the tied head repeats the last token) and, the end token's embedding scaled up, end after 0-7 tokens for
    most prompts and run to the budget for the rest."""
    from pipeline.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg.model.shape(tok.vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "wpe")):
                p.normal_(0, 0.2)
        model.wte.weight[tok.end_id] *= 3
    return model.eval()


def evaluate_replies(model, tok, cfg) -> list[list[int]]:
    """The evaluate stage's greedy zero-shot replies to its eval problems (its prompts, chunk by chunk)."""
    from pipeline.evaluation.evaluate import prompt_sets
    from pipeline.evaluation.metrics import score_chunk

    e = cfg.evaluate
    prompts = prompt_sets(e, tok, model.config.block_size, cfg.seed)[0]
    chunks = range(math.ceil(len(prompts.rows) / e.batch_size))
    return [r for c in chunks for r in score_chunk(model, tok, prompts, c, e, None, cfg.seed, True).zero_shot]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A micro workspace (params.yaml: OVERRIDES) whose export is `chatty_model` (as checkpoint `pretrain`) and whose
    eval split's answers are, for every other problem, that model's own greedy reply under evaluate, so exact match
    lies strictly between 0 and 1; metrics/evaluate.json holds evaluate's exact match of those replies. Returns the
    directory, the replies (ids and text), that exact match and the end token's id."""
    from pipeline.config.load import load_params, write_params
    from pipeline.config.root import load_config
    from pipeline.data.splits import SPLIT_FILES, load_split
    from pipeline.data.tasks import extract_answer
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluation.metrics import exact_match
    from pipeline.interop.hf import export_model
    from pipeline.paths import PREPARED, TOKENIZER_FILE

    work = seeded_workspace(tmp_path_factory.mktemp("lm_eval"), *OVERRIDES)
    old = Path.cwd()
    os.chdir(work)
    try:
        write_params(["experiment=micro", *OVERRIDES])
        cfg = load_config(load_params())
        tok = load_tokenizer(cfg.tokenizer.special_tokens)
        model = chatty_model(cfg, tok)
        replies = evaluate_replies(model, tok, cfg)
        texts = [tok.decode(tok.strip_response(r)) for r in replies]
        rows = load_split(PREPARED, "eval")
        for i, (row, text) in enumerate(zip(rows, texts)):
            if i % 2 == 0 and extract_answer(text):
                row["answer"] = extract_answer(text)
        (PREPARED / SPLIT_FILES["eval"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        ours = exact_match(tok, rows[: cfg.evaluate.max_problems], replies)
        Path("metrics/evaluate.json").write_text(json.dumps({"pretrain": {**ours, "run_id": "seeded-0"}}))
        export_model(model, tok, TOKENIZER_FILE, "artifacts/export", {"checkpoint": "pretrain", "run_id": "seeded-0"})
    finally:
        os.chdir(old)
    return {"dir": work, "replies": replies, "texts": texts, "exact_match": ours["exact_match"], "end_id": tok.end_id,
            "rows": rows[: cfg.evaluate.max_problems]}


def test_the_task_loads_with_lm_evals_own_loader_from_any_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    rows = [{"prompt": p, "question": f"Question: {p}", "answer": a, "family": "add", "key": f"add:{k}"}
            for p, a, k in (("What is 2 + 2?", "4", "2+2"), ("What is 3 plus 5?", "8", "3+5"))]
    config = lmeval.write_task(tmp_path / "tasks", rows, 7, "<|end|>")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    tasks = TaskManager(include_path=str(config.parent), include_defaults=False)
    task = tasks.load([lmeval.TASK])["tasks"][lmeval.TASK]
    assert task.config.dataset_kwargs["data_files"] == {"test": str(tmp_path / "tasks" / f"{lmeval.TASK}.jsonl")}
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs] == ["Question: What is 2 + 2?", "Question: What is 3 plus 5?"]
    assert task.config.generation_kwargs == {"until": ["<|end|>"], "do_sample": False, "temperature": 0.0,
                                             "max_gen_toks": 7}
    assert task.config.output_type == "generate_until" and task.config.num_fewshot == 0
    # graded by the pipeline's checker: the reply's first line must be the bare answer
    assert task.process_results(docs[0], ["4\nbecause"]) == {"exact_match": True}
    assert task.process_results(docs[0], ["44"]) == {"exact_match": False}


@pytest.mark.slow
def test_lm_eval_gives_evaluates_replies_and_exact_match(workspace, monkeypatch):
    stopped = [workspace["end_id"] in r for r in workspace["replies"]]
    assert any(stopped) and not all(stopped), "the premise: some replies end at the end token, some at the budget"
    assert 0 < workspace["exact_match"] < 1, "the premise: exact match says something"
    monkeypatch.chdir(workspace["dir"])
    assert run() == 0
    result = json.loads(Path("outputs/lm_eval/results.json").read_text())
    assert result["problems"] == len(workspace["rows"]) == 40
    assert [r["reply"] for r in result["replies"]] == workspace["texts"]
    assert result["lm_eval"]["exact_match"] == pytest.approx(workspace["exact_match"], abs=1e-6)
    assert result["evaluate"]["checkpoint"] == "pretrain" and result["evaluate"]["same_run"] is True
    assert result["difference"] == 0.0
    written = [json.loads(line) for line in Path(f"outputs/lm_eval/tasks/{lmeval.TASK}.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in written] == [(f"Question: {r['prompt']}", r["answer"])
                                                               for r in workspace["rows"]]


@pytest.mark.slow
def test_write_only_prints_the_command_and_failures_name_the_fix(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace["dir"])
    assert run("--write-only", "--tasks-dir", "tasks", "--out", "never.json") == 0
    out = capsys.readouterr().out
    assert "lm_eval --model hf --model_args pretrained=artifacts/export,dtype=float32,add_bos_token=False" in out
    assert "--include_path tasks --apply_chat_template" in out
    assert Path(f"tasks/{lmeval.TASK}.yaml").is_file() and not Path("never.json").exists()
    assert run("--model-dir", "no_export", "--tasks-dir", "tasks") == 2
    assert "no_export is not a transformers directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert run("--tasks-dir", "tasks", "--out", "never.json") == 2
    assert "pip install 'gpt-pipeline[lm-eval]'" in capsys.readouterr().err and not Path("never.json").exists()
