"""Tests for the hub-dataset adapters and `data.sources`: every adapter runs offline on a few-row
local fixture written in its hub dataset's own schema (tests/fixtures/hub/<dataset>.jsonl, read
through HF `datasets` like a download would be), `prepare` writes chat splits from them, and the
hub data configs compose. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from pipeline.config.data import DataConfig
from pipeline.config.load import compose
from pipeline.config.sources import ADAPTER_KINDS, SPLIT_KINDS, CorpusConfig, SourceConfig, SourcesConfig
from pipeline.data.datamodules import ChatData, PreferenceData
from pipeline.data.hub import ADAPTERS, RowError, load_rows
from pipeline.data.prepare import check_sources, prepare
from pipeline.data.splits import SPLIT_FILES, load_split
from pipeline.data.tokenizer import ChatTokenizer, train_bpe
from pipeline.inference.prompting import FewShotPool

MANIFEST_FILE = "manifest.json"

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def chat(family: str, messages: list[dict]) -> dict:
    return {"messages": messages, "family": family, "answer": messages[-1]["content"], "demo_error": None,
            "cot": False, "turns": len(messages) // 2, "earlier_keys": []}


def pair(family: str, prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "corruption": family, "family": family,
            "rejected_has_end": True}


def problem(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "answer": answer, "family": "gsm8k"}


# Per fixture row: the mapped row without its key, None (skipped), or RowError's field (malformed).
EXPECTED: dict[str, list[dict | str | None]] = {
    "smoltalk": [
        chat("smoltalk", [user("What is the capital of France?"), assistant("The capital of France is Paris.")]),
        chat("smoltalk", [user("You are a concise assistant.\n\nName a prime number."), assistant("7"),
                          user("And an even one?"), assistant("2 is the only even prime.")]),
        None,  # starts with the assistant
        chat("smoltalk", [user("Rewrite 'teh cat' correctly."), assistant("the cat")]),  # trailing user dropped
        "messages[1]",  # a message without content
    ],
    "ultrachat": [
        chat("ultrachat", [user("How do plants make food?"),
                           assistant("By photosynthesis: light, water and CO2 make sugar."),
                           user("Where does it happen?"), assistant("In the chloroplasts of leaf cells.")]),
        chat("ultrachat", [user("Give me a synonym for happy."), assistant("Joyful.")]),
        None,  # two user messages in a row
        "messages[0]",  # a message without a role
    ],
    "ultrafeedback": [
        pair("ultrafeedback", "What is 12 times 3?", "12 times 3 is 36.", "12 times 3 is 32."),
        pair("ultrafeedback", "Translate 'gato' to English.", "Cat.", "Dog."),
        None,  # a tie: chosen == rejected
        "rejected",  # missing
    ],
    "hh_rlhf": [
        pair("hh_rlhf", "What's a good name for a goldfish?", "How about Bubbles?", "Fish don't need names."),
        pair("hh_rlhf", "User: I want to bake bread.\nAssistant: Great! Do you have yeast?\nUser: Yes, dry yeast.",
             "Then mix it with warm water and a little sugar first.", "Buy bread instead."),
        None,  # empty rejected reply
        "rejected",  # missing
    ],
    "gsm8k": [
        problem("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?", "72"),
        problem("A shop sells 250 pens a day. How many pens does it sell in 4 days?", "1000"),
        problem("Tom has 5 apples and eats 2. How many are left?", "3"),
        "answer",  # no '####' line
    ],
}


def fixture_rows(dataset: str) -> list[dict]:
    import datasets
    return list(datasets.load_dataset("json", data_files=str(FIXTURES / f"{dataset}.jsonl"), split="train"))


def files_source(adapter: str, **extra: object) -> SourceConfig:
    return SourceConfig(source="files", adapter=adapter, data_files=str(FIXTURES / f"{adapter}.jsonl"), **extra)


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_adapter_maps_its_datasets_schema(dataset):
    adapt = ADAPTERS[dataset]
    rows = fixture_rows(dataset)
    assert len(rows) == len(EXPECTED[dataset])
    keys = set()
    for i, (raw, want) in enumerate(zip(rows, EXPECTED[dataset])):
        if isinstance(want, str):
            with pytest.raises(RowError) as err:
                adapt(raw)
            assert err.value.field == want, i
            continue
        got = adapt(raw)
        if want is None:
            assert got is None, i
            continue
        key = got.pop("key")
        assert re.fullmatch(rf"{dataset}:[0-9a-f]{{16}}", key), key
        keys.add(key)
        for field, value in want.items():
            assert got[field] == value, (i, field)
        assert set(got) == set(want), i
        assert adapt(raw)["key"] == key  # stable
    assert len(keys) == sum(isinstance(w, dict) for w in EXPECTED[dataset])


def test_every_adapter_is_declared_with_the_kind_of_row_it_makes():
    """The config checks adapters against ADAPTER_KINDS (no import of the adapters): the two must agree."""
    from pipeline.data.hub import check_row
    assert set(ADAPTERS) == set(ADAPTER_KINDS)
    for name, adapt in ADAPTERS.items():
        made = [row for raw, want in zip(fixture_rows(name), EXPECTED[name]) if isinstance(want, dict)
                for row in [adapt(raw)]]
        assert made, name
        for row in made:
            check_row(ADAPTER_KINDS[name], row)


def test_gsm8k_key_hashes_the_question():
    raw = fixture_rows("gsm8k")[2]
    assert ADAPTERS["gsm8k"](raw)["key"] == "gsm8k:" + hashlib.sha256(raw["question"].encode()).hexdigest()[:16]


@pytest.mark.parametrize(("dataset", "row", "field"), [
    ("smoltalk", 4, "messages[1]"), ("ultrachat", 3, "messages[0]"), ("ultrafeedback", 3, "rejected"),
    ("hh_rlhf", 3, "rejected"), ("gsm8k", 3, "answer"),
])
def test_malformed_row_is_an_error_naming_dataset_row_and_field(dataset, row, field):
    split = {"chat": "sft", "preference": "preference", "problem": "eval"}[ADAPTER_KINDS[dataset]]
    with pytest.raises(ValueError, match=rf"data\.sources\.{split} \({dataset}: .*{dataset}\.jsonl.* row {row}: "
                                         rf"field '{re.escape(field)}'"):
        load_rows(split, files_source(dataset))


def test_max_rows_and_max_chars_are_counted(tmp_path):
    rows, counts = load_rows("sft", files_source("smoltalk", max_rows=3))
    assert len(rows) == 3 and counts == {"read": 4, "skipped": 1, "too_long": 0}  # stops before the bad row
    rows, counts = load_rows("sft", files_source("smoltalk", max_rows=1, max_chars=40))
    assert [r["answer"] for r in rows] == ["the cat"]  # the rows over 40 characters dropped and counted
    assert counts == {"read": 4, "skipped": 1, "too_long": 2}
    good = tmp_path / "gsm8k.jsonl"  # the well-formed rows only
    good.write_text("".join((FIXTURES / "gsm8k.jsonl").read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match=r"no usable rows \({'read': 3, 'skipped': 0, 'too_long': 3}\)"):
        load_rows("eval", SourceConfig(source="files", adapter="gsm8k", data_files=str(good), max_chars=10))


@pytest.mark.parametrize(("split", "node", "error"), [
    ("sft", {"source": "files", "adapter": "gsm8k", "data_files": str(FIXTURES / "gsm8k.jsonl")},
     r"data\.sources\.sft\.adapter 'gsm8k' makes problem rows but sft holds chat rows: use one of smoltalk, ultrachat"),
    ("eval", {"source": "hub", "adapter": "gsm8k"}, r"data\.sources\.eval\.path is required"),
    ("eval", {"source": "hub", "adapter": "mmlu", "path": "x/y"}, r"data\.sources\.eval\.adapter 'mmlu' is unknown"),
    ("eval", {"source": "web"}, r"data\.sources\.eval\.source 'web' is unknown: choose one of generated, hub, files"),
    ("eval", {"source": "files", "adapter": "gsm8k", "data_files": "gsm8k.csv"}, r"must end in one of"),
    ("eval", {"source": "generated", "url": "x"}, r"data\.sources\.eval\.url is not a setting of data\.sources\.eval"),
    ("eval", {"source": "files", "adapter": "gsm8k", "data_files": str(FIXTURES / "gsm8k.jsonl"), "max_rows": 0},
     r"data\.sources\.eval\.max_rows is 0: it must be >= 1"),
])
def test_source_config_errors_name_the_field(split, node, error):
    with pytest.raises(ValueError, match=error):
        SourcesConfig.parse({split: node}, "data.sources")


def test_a_missing_source_file_is_refused_before_prepare_does_any_work(tmp_path):
    cfg = DataConfig.parse({"sources": {"eval": {"source": "files", "adapter": "gsm8k",
                                                 "data_files": "nowhere/gsm8k.jsonl"}}})
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.eval\.data_files names nowhere/gsm8k\.jsonl"):
        check_sources(cfg)


def test_missing_sources_mean_generated_and_unknown_splits_are_refused():
    assert {c.source for c in SourcesConfig().external().values()} == set()
    assert DataConfig.parse(compose([]).data).sources.external() == {}
    with pytest.raises(ValueError, match=r"data\.sources\.pretrain is not a setting of data\.sources: its settings"):
        SourcesConfig.parse({"pretrain": {"source": "generated"}}, "data.sources")


def files_overrides(split: str, adapter: str, max_rows: int) -> list[str]:
    p = f"data.sources.{split}"
    return [f"{p}.source=files", f"{p}.adapter={adapter}", f"{p}.data_files={FIXTURES / f'{adapter}.jsonl'}",
            f"{p}.max_rows={max_rows}"]


def test_prepare_writes_chat_splits_from_hub_fixtures(tmp_path):
    cfg = compose(["experiment=micro", *files_overrides("sft", "smoltalk", 3),
                   *files_overrides("preference", "ultrafeedback", 2), *files_overrides("eval", "gsm8k", 3)])
    metrics = prepare(cfg.data, tmp_path / "hub", progress=False)
    prepare(compose(["experiment=micro"]).data, tmp_path / "gen", progress=False)

    manifest = json.loads((tmp_path / "hub" / MANIFEST_FILE).read_text())
    for split, name in SPLIT_FILES.items():
        data = (tmp_path / "hub" / name).read_bytes()
        assert manifest["sha256"][name] == hashlib.sha256(data).hexdigest()
        if split in ("pretrain", "pretrain_val", "rl_prompts", "eval_hard"):  # generated ones are unchanged
            assert data == (tmp_path / "gen" / name).read_bytes(), split
    assert manifest["sources"]["sft"] | {"read": 4, "skipped": 1, "too_long": 0} == manifest["sources"]["sft"]
    assert manifest["sources"]["eval"]["adapter"] == "gsm8k" and "rl_prompts" not in manifest["sources"]
    assert "sources" not in json.loads((tmp_path / "gen" / MANIFEST_FILE).read_text())
    assert manifest["counts"] | {"sft": 3, "preference": 2, "eval": 3} == manifest["counts"]
    assert manifest["per_family"]["eval"] == {"gsm8k": 3}
    assert metrics["sft_skipped"] == 1 and metrics["preference_skipped"] == 0 and metrics["eval_too_long"] == 0
    assert metrics["leaked_keys"] == 0 and metrics["sft_rows"] == 3 and metrics["eval_rows"] == 3

    for split, dataset in (("sft", "smoltalk"), ("preference", "ultrafeedback"), ("eval", "gsm8k")):
        want = [w for w in EXPECTED[dataset] if isinstance(w, dict)][: manifest["counts"][split]]
        got = load_split(tmp_path / "hub", split)
        assert [{k: v for k, v in r.items() if k != "key"} for r in got] == want, split

    # the stages that read these splits accept them
    texts = [r["text"] for r in load_split(tmp_path / "hub", "pretrain")]
    tok = ChatTokenizer(train_bpe(texts, 300, SPECIALS), SPECIALS)
    sft = ChatData(tmp_path / "hub", tok, block_size=128, batch_size=2, seed=0)
    sft.setup()
    assert len(sft.train_set) + len(sft.val_set) == 3
    pref = PreferenceData(tmp_path / "hub", tok, block_size=128, batch_size=2, seed=0, val_fraction=0.5)
    pref.setup()
    assert len(pref.train_set) + len(pref.val_set) == 2
    eval_keys = {r["key"] for r in load_split(tmp_path / "hub", "eval")}
    FewShotPool(load_split(tmp_path / "hub", "sft"), eval_keys, seed=0)


def test_hub_training_and_eval_sharing_rows_is_refused(tmp_path):
    cfg = compose(["experiment=micro", *files_overrides("rl_prompts", "gsm8k", 2),
                   *files_overrides("eval", "gsm8k", 3)])
    with pytest.raises(RuntimeError, match="leakage audit found 2"):
        prepare(cfg.data, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_tinystories_and_hub_configs_compose():
    default, tiny = compose([]).data, compose(["data=tinystories"]).data
    corpus = CorpusConfig.parse(tiny.corpus)
    assert (corpus.source, corpus.path, corpus.split, corpus.val_split, corpus.text_field) == (
        "hub", "roneneldan/TinyStories", "train", "validation", "text")
    assert {k: v for k, v in tiny.items() if k != "corpus"} == {k: v for k, v in default.items() if k != "corpus"}

    hub = compose(["data=hub"]).data
    assert hub.corpus == tiny.corpus
    sources = DataConfig.parse(hub).sources  # checks each adapter against its split
    assert {s: (getattr(sources, s).source, getattr(sources, s).adapter) for s in SPLIT_KINDS} == {
        "sft": ("hub", "smoltalk"), "preference": ("hub", "ultrafeedback"), "rl_prompts": ("hub", "gsm8k"),
        "eval": ("hub", "gsm8k"), "eval_hard": ("generated", None)}
    assert (sources.rl_prompts.split, sources.eval.split) == ("train", "test")  # GSM8K's own split
