"""Tests for the synthetic data generator: determinism, no eval leakage, correct answers,
corruptions that the checker rejects, config validation and the manifest.

Answers, the eval-partition hash and the pretraining prose forms are re-derived here
independently of `pipeline.data.tasks`, so a bug there cannot hide behind itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config.data import CORRUPTIONS, FAMILIES
from pipeline.data.prepare import prepare
from pipeline.data.splits import SPLIT_FILES, load_split
from pipeline.data.tasks import (
    Problem,
    answer_for_key,
    check,
    extract_answer,
    final_answer,
    problem_key_in_eval,
    worked_solution,
)
from pipeline.data.world import build_world

EVAL_FRACTION = 0.2  # larger than the default so the leakage checks see many eval keys
TRAIN_SPLITS = ("sft", "preference", "rl_prompts")


def small_cfg(**overrides: object):
    base = {
        "seed": 1234, "digits": 2, "hard_digits": 3, "eval_fraction": EVAL_FRACTION,
        "families": {"add": 3, "sub": 2, "reverse": 1, "sort": 1, "count": 1, "fact": 1},
        "world": {"n_entities": 12, "seed": 7},
        "sizes": {"pretrain_docs": 300, "pretrain_val_docs": 40, "sft": 400, "preference": 400,
                  "rl_prompts": 100, "eval": 120, "eval_hard": 40},
        "string_len": {"min": 3, "max": 6},
        "demo_errors": {"rate": 0.3, "kinds": ["preamble", "carry_error"]},
        "cot": {"fraction": 0.25, "trigger": "Think step by step."},
        "multi_turn": {"fraction": 0.3, "max_turns": 3},
    }
    cfg = OmegaConf.create(base)
    for dotted, value in overrides.items():
        OmegaConf.update(cfg, dotted.replace("__", "."), value, merge=False)
    return cfg


def in_eval(key: str, fraction: float = EVAL_FRACTION) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def expected_answer(key: str) -> str | None:
    """Independent answers for the families that need no world."""
    family, rest = key.split(":", 1)
    if family == "add":
        a, b = rest.split("+")
        return str(int(a) + int(b))
    if family == "sub":
        a, b = rest.split("-")
        return str(int(a) - int(b))
    if family == "reverse":
        return "".join(reversed(rest))
    if family == "sort":
        return "".join(sorted(rest))
    if family == "count":
        letter, word = rest.split(":")
        return str(sum(ch == letter for ch in word))
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two seeds on the small config."""
    out = {}
    for seed in (1, 2):
        out[seed] = tmp_path_factory.mktemp(f"seed{seed}") / "data"
        metrics = prepare(small_cfg(seed=seed), out[seed], progress=False)
        assert metrics["leaked_keys"] == 0
    return out


def rows(data_dir: Path, split: str) -> list[dict]:
    return load_split(data_dir, split)


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files(runs: dict[int, Path], tmp_path: Path) -> None:
    again = tmp_path / "data"
    prepare(small_cfg(seed=1), again, progress=True)
    names = [*SPLIT_FILES.values(), "manifest.json"]
    for name in names:
        assert (again / name).read_bytes() == (runs[1] / name).read_bytes(), name


def test_different_seed_changes_samples_not_partition(runs: dict[int, Path]) -> None:
    sft1, sft2 = rows(runs[1], "sft"), rows(runs[2], "sft")
    assert [r["key"] for r in sft1] != [r["key"] for r in sft2]
    assert (runs[1] / "pretrain.jsonl").read_bytes() != (runs[2] / "pretrain.jsonl").read_bytes()
    # The eval set is a function of the problem space only, so every seed is scored on it.
    assert rows(runs[1], "eval") == rows(runs[2], "eval")
    keys = {r["key"] for run in runs.values() for split in (*TRAIN_SPLITS, "eval", "eval_hard")
            for r in rows(run, split)}
    for key in keys:
        for fraction in (0.05, EVAL_FRACTION, 0.5):
            assert problem_key_in_eval(key, fraction) == in_eval(key, fraction), key


# ------------------------------------------------------------------ leakage

_SENTENCE_FORMS: list[tuple[str, str, tuple[int, ...]]] = [
    # (regex, family, order of (operand/word groups..., claimed answer)) for every prose template
    (r"(\d+) plus (\d+) (?:equals|is) (\d+)", "add", (1, 2, 3)),
    (r"The sum of (\d+) and (\d+) is (\d+)", "add", (1, 2, 3)),
    (r"Adding (\d+) and (\d+) gives (\d+)", "add", (1, 2, 3)),
    (r"(\d+) \+ (\d+) = (\d+)", "add", (1, 2, 3)),
    (r"\w+ had (\d+) \w+ and got (\d+) more, so now \w+ has (\d+)", "add", (1, 2, 3)),
    (r"(\d+) minus (\d+) (?:equals|is) (\d+)", "sub", (1, 2, 3)),
    (r"If you take (\d+) from (\d+) you get (\d+)", "sub", (2, 1, 3)),
    (r"The difference between (\d+) and (\d+) is (\d+)", "sub", (1, 2, 3)),
    (r"(\d+) - (\d+) = (\d+)", "sub", (1, 2, 3)),
    (r"\w+ had (\d+) \w+ and gave away (\d+), so (\d+) were left", "sub", (1, 2, 3)),
    (r"The word ([a-z]+) reversed is ([a-z]+)", "reverse", (1, 2)),
    (r"Spelled backwards, ([a-z]+) is ([a-z]+)", "reverse", (1, 2)),
    (r"If you reverse ([a-z]+) you get ([a-z]+)", "reverse", (1, 2)),
    (r"([a-z]+) backwards is ([a-z]+)", "reverse", (1, 2)),
    (r"The letters of ([a-z]+) in sorted order are ([a-z]+)", "sort", (1, 2)),
    (r"Sorting the letters of ([a-z]+) gives ([a-z]+)", "sort", (1, 2)),
    (r"In alphabetical order, the letters of ([a-z]+) are ([a-z]+)", "sort", (1, 2)),
    (r"There are (\d+) ([a-z])'s in ([a-z]+)", "count", (2, 3, 1)),
    (r"The word ([a-z]+) has (\d+) ([a-z])'s", "count", (3, 1, 2)),
    (r"The letter ([a-z]) appears (\d+) times in ([a-z]+)", "count", (1, 3, 2)),
]


def prose_keys(text: str) -> list[tuple[str, str]]:
    """(key, claimed answer) for every sentence of an arith/string document; fails on unknown prose."""
    found = []
    for sentence in re.split(r"(?<=\.) ", text):
        for pattern, family, order in _SENTENCE_FORMS:
            m = re.fullmatch(pattern + r"\.", sentence)
            if m:
                *args, claimed = (m.group(i) for i in order)
                sep = {"add": "+", "sub": "-"}.get(family, ":")
                found.append((f"{family}:{sep.join(args)}", claimed))
                break
        else:
            raise AssertionError(f"pretraining sentence in no known form: {sentence!r}")
    return found


@pytest.mark.parametrize("seed", [1, 2])
def test_no_eval_problem_in_training(runs: dict[int, Path], seed: int) -> None:
    run = runs[seed]
    held = {r["key"] for split in ("eval", "eval_hard") for r in rows(run, split)}
    assert held and all(in_eval(k) for k in held)
    train = {r["key"] for split in TRAIN_SPLITS for r in rows(run, split)}
    assert not train & held
    assert not any(in_eval(k) for k in train)
    assert {k.split(":")[0] for k in held} == {"add", "sub", "reverse", "sort", "count", "fact"}

    prose = 0
    for split in ("pretrain", "pretrain_val"):
        for doc in rows(run, split):
            if doc["kind"] in ("fact", "story"):
                assert not re.search(r"\d", doc["text"]), doc  # no arithmetic hiding in prose about the world
                continue
            for key, claimed in prose_keys(doc["text"]):
                prose += 1
                assert not in_eval(key) and key not in held, (key, doc["text"])
                assert claimed == expected_answer(key), (key, claimed)
                if key.startswith(("add", "sub")):
                    assert all(len(x) <= 2 for x in re.split(r"[+-]", key.split(":")[1])), key
    assert prose > 500


def test_every_entity_fact_is_in_pretraining(runs: dict[int, Path]) -> None:
    world = build_world(12, 7)
    facts = [d["text"] for d in rows(runs[1], "pretrain") if d["kind"] == "fact"]
    for e in world.entities:
        values = [e.species, e.color, e.home, e.food, e.friend]
        full_profiles = [t for t in facts if e.name in t and all(v in t for v in values)]
        assert len(full_profiles) >= 3, e.name
    # eval fact questions are answerable only from pretraining: their answers are stated there
    eval_facts = [r for r in rows(runs[1], "eval") if r["family"] == "fact"]
    assert eval_facts
    for r in eval_facts:
        name = world.entity(r["key"].split(":")[1]).name
        assert any(name in t and r["answer"] in t for t in facts), r


# ------------------------------------------------------------------ answers and checker


def test_answers_are_correct(runs: dict[int, Path]) -> None:
    run = runs[1]
    world = build_world(12, 7)
    for split in ("sft", "rl_prompts", "eval", "eval_hard", "preference"):
        for r in rows(run, split):
            answer = r.get("answer", r.get("chosen"))
            family, rest = r["key"].split(":", 1)
            assert family == r["family"]
            expected = expected_answer(r["key"])
            if expected is None:
                entity, attr = rest.split(":")
                expected = getattr(world.entity(entity), attr)
                prompt = r["messages"][-2]["content"] if split == "sft" else r["prompt"]
                assert world.entity(entity).name in prompt
            assert answer == expected, r
            assert " " not in answer and answer  # short answers only
    for r in rows(run, "eval_hard"):
        a, b = re.split(r"[+-]", r["key"].split(":")[1])
        assert len(a) == len(b) == 3 and r["family"] in ("add", "sub")
    for r in rows(run, "sft"):
        nums = re.findall(r"\d+", r["messages"][-2]["content"])
        if r["family"] in ("add", "sub"):
            assert nums == re.split(r"[+-]", r["key"].split(":")[1])
        elif r["family"] in ("reverse", "sort"):
            assert r["key"].split(":")[1] in r["messages"][-2]["content"]


def test_checker_basics() -> None:
    assert check("68", "68") and check("68", "  68 \n") and check("68", "68\nand more text")
    assert check("Kelmar", "\n Kelmar \n\n")
    assert not check("68", "680") and not check("68", "68.") and not check("68", "6 8") and not check("68", "")
    assert not check("68", "68, I think. Yes.")
    assert extract_answer("  ovat \nsomething") == "ovat" and extract_answer("   ") == ""
    assert Problem("add", "add:1+2", "What is 1 + 2?", "3").answer == "3"


def test_preference_corruptions_fail_the_checker(runs: dict[int, Path]) -> None:
    prefs = rows(runs[1], "preference")
    world = build_world(12, 7)
    seen: dict[str, set[str]] = {}
    for r in prefs:
        kind, chosen, rejected = r["corruption"], r["chosen"], r["rejected"]
        seen.setdefault(r["family"], set()).add(kind)
        assert kind in CORRUPTIONS[r["family"]]
        assert check(chosen, chosen) and chosen == expected_answer(r["key"]) or r["family"] == "fact"
        assert r["rejected_has_end"] == (kind != "missing_end")
        if kind == "missing_end":
            assert rejected == chosen
            continue
        assert rejected != chosen and not check(chosen, rejected), r
        args = re.split(r"[+-]", r["key"].split(":")[1]) if r["family"] in ("add", "sub") else []
        if kind == "off_by_one":
            assert abs(int(rejected) - int(chosen)) == 1
        elif kind == "off_by_ten":
            assert abs(int(rejected) - int(chosen)) == 10
        elif kind == "wrong_operator":
            a, b = map(int, args)
            assert int(rejected) == (a - b if r["family"] == "add" else a + b)
        elif kind == "carry_error":
            a, b = args[0].zfill(3), args[1].zfill(3)
            op = (lambda x, y: (x + y) % 10) if r["family"] == "add" else (lambda x, y: (x - y) % 10)
            assert int(rejected) == int("".join(str(op(int(x), int(y))) for x, y in zip(a, b)))
        elif kind in ("swapped_digits", "swapped_letters"):
            assert sorted(rejected) == sorted(chosen) and sum(x != y for x, y in zip(rejected, chosen)) == 2
        elif kind == "wrong_entity":
            attr = r["key"].split(":")[2]
            assert rejected in {getattr(e, attr) for e in world.entities}
        elif kind == "copied_input":
            assert rejected == r["key"].split(":")[1]
        elif kind == "rambling":
            assert len(rejected.split()) >= 5 and "\n" not in rejected
        elif kind == "preamble":
            assert rejected.startswith("The answer is ") and chosen in rejected
    for family, kinds in CORRUPTIONS.items():
        assert seen[family] == set(kinds), family


# ------------------------------------------------------------------ config validation and files


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sizes__sft": 0}, "data.sizes.sft"),
        ({"sizes__eval_hard": -3}, "data.sizes.eval_hard"),
        ({"eval_fraction": 0.0}, "data.eval_fraction"),
        ({"eval_fraction": 0.7}, "data.eval_fraction"),
        ({"hard_digits": 2}, "data.hard_digits (2) must be greater than data.digits (2)"),
        ({"families": {"add": 1, "mul": 2}}, "data.families"),
        ({"families": {"add": 0, "sub": 0}}, "data.families"),
        ({"string_len": {"min": 7, "max": 6}}, "data.string_len.min"),
        ({"world__n_entities": 1}, "data.world.n_entities"),
        ({"digits": "two"}, "data.digits"),
        ({"demo_errors__rate": 0.5}, "data.demo_errors.rate"),
        ({"demo_errors__kinds": ["preamble", "typo"]}, "data.demo_errors.kinds"),
        ({"demo_errors__kinds": "preamble"}, "data.demo_errors.kinds"),
        ({"cot__fraction": 1.5}, "data.cot.fraction"),
        ({"cot__trigger": " "}, "data.cot.trigger"),
        ({"multi_turn__fraction": -0.1}, "data.multi_turn.fraction"),
        ({"multi_turn__max_turns": 1}, "data.multi_turn.max_turns"),
    ],
)
def test_bad_config_raises_and_writes_nothing(tmp_path: Path, overrides: dict, field: str) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(ValueError, match=re.escape(field)):
        prepare(small_cfg(**overrides), parent / "data", progress=False)
    assert list(parent.iterdir()) == []


def test_demo_errors_are_plausible_wrong_replies_at_the_configured_rate(runs: dict[int, Path]) -> None:
    sft = [r for r in rows(runs[1], "sft") if not r["cot"]]  # worked solutions are never given errors
    wrong = [r for r in sft if r["demo_error"] is not None]
    # every SFT family has `preamble`: the share is the configured 0.3, up to sampling noise
    assert abs(len(wrong) / len(sft) - 0.3) < 0.07
    assert {r["demo_error"] for r in wrong} == {"preamble", "carry_error"}
    for r in sft:
        reply = r["messages"][-1]["content"]
        if r["demo_error"] is None:
            assert reply == r["answer"]
            continue
        assert not check(r["answer"], reply), r  # the checker rejects every flawed demonstration
        if r["demo_error"] == "preamble":
            assert reply.startswith("The answer is ") and r["answer"] in reply
        else:
            assert r["family"] in ("add", "sub") and reply.lstrip("-").isdigit()


def test_zero_demo_error_rate_leaves_every_demonstration_correct(tmp_path: Path) -> None:
    prepare(small_cfg(demo_errors__rate=0.0, cot__fraction=0.0), tmp_path / "data", progress=False)
    sft = rows(tmp_path / "data", "sft")
    assert all(r["demo_error"] is None and r["messages"][-1]["content"] == r["answer"] for r in sft)
    assert not any(r["cot"] for r in sft)


def test_multi_turn_rows_precede_the_problem_with_correct_training_exchanges(runs: dict[int, Path]) -> None:
    world = build_world(12, 7)
    sft = rows(runs[1], "sft")
    direct = [r for r in sft if not r["cot"]]
    longer = [r for r in sft if r["turns"] > 1]
    assert abs(len(longer) / len(direct) - 0.3) < 0.07 and not any(r["cot"] for r in longer)
    assert {r["turns"] for r in longer} == {2, 3}
    for r in longer:
        messages = r["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * r["turns"]
        assert len(r["earlier_keys"]) == r["turns"] - 1
        for key, reply in zip(r["earlier_keys"], messages[1:-2:2]):
            assert not in_eval(key) and reply["content"] == answer_for_key(key, world)
    assert all(r["earlier_keys"] == [] for r in sft if r["turns"] == 1)


def test_worked_solutions_ask_with_the_trigger_and_end_in_the_answer(runs: dict[int, Path]) -> None:
    sft = rows(runs[1], "sft")
    worked = [r for r in sft if r["cot"]]
    assert abs(len(worked) / len(sft) - 0.25) < 0.07
    assert {r["family"] for r in worked} == set(FAMILIES)
    for r in sft:
        prompt, reply = r["messages"][-2]["content"], r["messages"][-1]["content"]
        assert prompt.endswith(" Think step by step.") == r["cot"]
        if r["cot"]:
            assert r["demo_error"] is None
            assert final_answer(reply) == r["answer"]
            assert r["family"] == "fact" or r["answer"] == expected_answer(r["key"])
            # the strict check wants the bare answer
            assert reply.endswith(f"Answer: {r['answer']}") and not check(r["answer"], reply)


def test_a_field_left_out_takes_the_default_of_conf(tmp_path: Path) -> None:
    from pipeline.config.data import DataConfig
    from pipeline.config.load import compose
    cfg = small_cfg()
    del cfg["sizes"]["rl_prompts"]
    assert DataConfig.parse(cfg).sizes.rl_prompts == compose().data.sizes.rl_prompts


def test_manifest_matches_files(runs: dict[int, Path]) -> None:
    run = runs[1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 1 and manifest["config"]["sizes"]["sft"] == 400
    for split, name in SPLIT_FILES.items():
        lines = (run / name).read_text().splitlines()
        data = [json.loads(line) for line in lines]
        assert manifest["counts"][split] == len(data) > 0
        field = "kind" if split.startswith("pretrain") else "family"
        assert manifest["per_family"][split] == dict(Counter(r[field] for r in data))
        assert manifest["sha256"][name] == hashlib.sha256((run / name).read_bytes()).hexdigest()
    assert manifest["counts"]["sft"] == 400 and manifest["counts"]["eval_hard"] == 40
    assert sum(manifest["corruptions"].values()) == manifest["counts"]["preference"]


def test_pretrain_documents_shape(runs: dict[int, Path]) -> None:
    docs = rows(runs[1], "pretrain")
    assert {d["kind"] for d in docs} == {"story", "fact", "arith", "string"}
    assert all(set(d) == {"text", "kind"} for d in docs)
    assert all(100 <= len(d["text"]) <= 400 for d in docs), min(len(d["text"]) for d in docs)
    val = {d["text"] for d in rows(runs[1], "pretrain_val")}
    assert not val & {d["text"] for d in docs}


def test_rewrite_replaces_output_atomically(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    metrics = prepare(small_cfg(), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLIT_FILES.values(), "manifest.json"])
    assert metrics["sft_rows"] == 400 and metrics["eval_rows"] == len(load_split(out, "eval"))
    with pytest.raises(ValueError, match="unknown split"):
        load_split(out, "train")


@pytest.mark.parametrize(("key", "steps"), [
    ("add:47+38", "7+8=15, so 5 carry 1. 4+3+1=8, so 85. Answer: 85"),
    ("add:95+7", "5+7=12, so 2 carry 1. 9+0+1=10, so 102. Answer: 102"),
    ("sub:52-17", "12-7=5, so 5 borrow 1. 5-1-1=3, so 35. Answer: 35"),
    ("sub:100-1", "10-1=9, so 9 borrow 1. 10-0-1=9, so 99 borrow 1. 1-0-1=0, so 99. Answer: 99"),
    ("reverse:tavo", "Letters: t a v o. Backwards: o v a t. Answer: ovat"),
    ("sort:tavo", "Letters: t a v o. Sorted: a o t v. Answer: aotv"),
    ("count:a:banana", "Letters: b a n a n a. Count of a: 0 1 1 2 2 3. Answer: 3"),
])
def test_worked_solution_shows_each_column_and_letter(key: str, steps: str) -> None:
    assert worked_solution(key, build_world(6, 7)) == steps


def test_every_worked_arithmetic_solution_reaches_the_right_answer() -> None:
    world = build_world(6, 7)
    for a in range(0, 1000, 7):
        for b in range(0, 1000, 11):
            for key in (f"add:{a}+{b}", f"sub:{max(a, b)}-{min(a, b)}"):
                assert final_answer(worked_solution(key, world)) == answer_for_key(key, world) == expected_answer(key)


@pytest.mark.parametrize(("response", "answer"), [
    ("7+8=15, so 5 carry 1. 4+3+1=8, so 85. Answer: 85", "85"),
    ("Answer: 12.\nand then some rambling", "12"),           # closing period and later lines ignored
    ("Answer: 3 ... no wait. Answer: 4", "4"),               # the last commitment counts
    ("Letters: t a v o. Backwards: o v a t. Answer:", ""),  # cut off before the answer
    ("85\nmore text", "85"),                                 # no marker: graded on the first line
    ("", ""),
])
def test_final_answer_extraction_on_crafted_outputs(response: str, answer: str) -> None:
    assert final_answer(response) == answer
