"""Prompting: templates from config, few-shot exemplars from training data only, the chain-of-thought ask."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.data.prepare import prepare
from pipeline.data.splits import load_split
from pipeline.data.tokenizer import ChatTokenizer, train_bpe
from pipeline.evaluation.metrics import PromptSet, check_final
from pipeline.inference.prompting import FewShotPool, PromptTemplates, few_shot_prompt

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prepared splits from the real generator (eval fraction raised so many eval keys exist)."""
    cfg = OmegaConf.create({
        "seed": 5, "digits": 2, "hard_digits": 3, "eval_fraction": 0.3,
        "families": {"add": 3, "sub": 2, "reverse": 1, "sort": 1, "count": 1, "fact": 1},
        "world": {"n_entities": 8, "seed": 7},
        "sizes": {"pretrain_docs": 120, "pretrain_val_docs": 10, "sft": 600, "preference": 10, "rl_prompts": 10,
                  "eval": 150, "eval_hard": 40},
        "string_len": {"min": 3, "max": 6},
        "demo_errors": {"rate": 0.3, "kinds": ["preamble"]},
        "cot": {"fraction": 0.3, "trigger": "Think step by step."},
        "multi_turn": {"fraction": 0.3, "max_turns": 3},
    })
    out = tmp_path_factory.mktemp("prompting") / "data"
    prepare(cfg, out, progress=False)
    return {split: load_split(out, split) for split in ("pretrain", "sft", "eval", "eval_hard")}


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory) -> ChatTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([r["text"] for r in data["pretrain"]], 400, SPECIALS).save(str(path))
    return ChatTokenizer.load(path, SPECIALS)


def test_few_shot_prompts_never_contain_an_eval_problem(data, tok):
    held = data["eval"] + data["eval_hard"]
    eval_keys = {r["key"] for r in held}
    eval_questions = {r["prompt"] for r in held}
    pool = FewShotPool(data["sft"], eval_keys, seed=0)
    templates = PromptTemplates(shots=3)
    for row in held:
        shots = pool.exemplars(row, 3)
        assert len(shots) == 3 and not {e["key"] for e in shots} & eval_keys
        assert all(e["family"] == row["family"] for e in shots)
        ids, used = few_shot_prompt(tok, templates, shots, row["prompt"], room=400)
        assert used == 3
        # decode each earlier turn: none asks an eval question, each shows a correct, direct answer
        turns = _turns(tok, ids)
        assert turns[-1] == (row["prompt"], None)
        for question, answer in turns[:-1]:
            assert question not in eval_questions
            assert (question, answer) in {(e["prompt"], e["answer"]) for e in shots}


def _turns(tok: ChatTokenizer, ids: list[int]) -> list[tuple[str, str | None]]:
    """(question, answer) per turn of a chat-template prompt; the open last turn has answer None."""
    assert ids[0] == tok.bos_id
    out, i = [], 1
    while i < len(ids):
        assert ids[i] == tok.user_id
        j = ids.index(tok.assistant_id, i)
        k = ids.index(tok.end_id, j) if tok.end_id in ids[j:] else None
        out.append((tok.decode(ids[i + 1:j]), None if k is None else tok.decode(ids[j + 1:k])))
        i = len(ids) if k is None else k + 1
    return out


def test_the_pool_refuses_an_eval_row_and_skips_flawed_or_worked_demonstrations(data):
    eval_row = {**data["sft"][0], "key": data["eval"][0]["key"]}
    with pytest.raises(ValueError, match=data["eval"][0]["key"]):
        FewShotPool([*data["sft"], eval_row], {r["key"] for r in data["eval"]}, seed=0)
    pool = FewShotPool(data["sft"], set(), seed=0)
    shown = {(e["prompt"], e["answer"]) for rows in pool.by_family.values() for e in rows}
    clean = {(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in data["sft"]
             if not r["cot"] and not r["demo_error"]}
    assert shown == clean  # every direct, correct demonstration, and only those
    assert all("step by step" not in prompt for prompt, _ in shown)


def test_exemplars_are_deterministic_and_never_the_question_itself(data):
    pool = FewShotPool(data["sft"], set(), seed=0)
    row = next(r for r in data["sft"] if not r["cot"] and not r["demo_error"])
    assert pool.exemplars(row, 3) == pool.exemplars(row, 3)
    assert row["key"] not in {e["key"] for e in pool.exemplars(row, 50)}
    assert pool.exemplars(row, 3) != FewShotPool(data["sft"], set(), seed=1).exemplars(row, 3)


def test_farthest_exemplars_are_dropped_to_fit_the_context(data, tok):
    pool = FewShotPool(data["sft"], set(), seed=0)
    row = data["eval"][0]
    shots = pool.exemplars(row, 3)
    full, used = few_shot_prompt(tok, PromptTemplates(), shots, row["prompt"], room=1000)
    assert used == 3
    room = len(full) - 1  # one token short: the first exemplar must go
    fitted, used = few_shot_prompt(tok, PromptTemplates(), shots, row["prompt"], room=room)
    assert used == 2 and len(fitted) <= room
    assert _turns(tok, fitted) == _turns(tok, full)[1:]


def test_templates_shape_every_prompt_and_cot_asks_with_the_training_trigger(data, tok):
    templates = PromptTemplates(zero_shot="Question: {question}", cot="{question} {trigger}", shots=2,
                                trigger="Think step by step.")
    pool = FewShotPool(data["sft"], set(), seed=0)
    prompts = PromptSet.build(tok, templates, pool, data["eval"][:5], room=120)
    for row, zero, cot in zip(prompts.rows, prompts.zero_shot, prompts.cot):
        assert _turns(tok, zero) == [(f"Question: {row['prompt']}", None)]
        assert _turns(tok, cot) == [(f"{row['prompt']} Think step by step.", None)]
    # the training data asked for steps with exactly that phrase
    worked = [r for r in data["sft"] if r["cot"]]
    assert worked and all(r["messages"][0]["content"].endswith(" Think step by step.") for r in worked)
    assert prompts.shots == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("zero_shot", "Tell me", "must contain {question}"),
    ("cot", "{question} {steps}", "use only {question} and {trigger}"),
    ("shots", -1, "it must be >= 0"),
])
def test_bad_templates_are_refused_by_field(field, value, message):
    from pipeline.config.evaluate import PromptsConfig
    pattern = f"evaluate.prompts.{field}.*{message}".replace("{", r"\{").replace("}", r"\}")
    with pytest.raises(ValueError, match=pattern):
        PromptsConfig.parse({field: value})


def test_cot_grading_reads_the_committed_answer():
    assert check_final("85", "7+8=15, so 5 carry 1. 4+3+1=8, so 85. Answer: 85")
    assert not check_final("85", "7+8=15, so 5 carry 1. 4+3+1=8, so 85. Answer: 84")
    assert not check_final("85", "7+8=15, so 5 carry 1. 4+3+1=8, so 85.")  # never committed
    assert check_final("85", "85")  # a direct answer still counts
