"""Tests for weighted data mixtures (`data.mixtures.<split>`, a list of sources): a two-source SFT mixture of
the generator and a local file in smoltalk's schema prepares offline with the counts `mixture_counts` gives,
recorded in the metrics and manifest, seeded, and checked for eval leaks across both sources; a bad mixture
is refused before any work, naming the field; the command-line form composes with Hydra as written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config.data import FAMILIES, DataConfig
from pipeline.config.sources import MixturesConfig, MixtureSource, mixture_counts
from pipeline.data.prepare import check_sources, prepare
from pipeline.data.splits import SPLIT_FILES, load_split
from tests.conftest import compose_micro

SFT_SIZE = 300  # conf/experiment/micro.yaml: data.sizes.sft


def write_smoltalk(path: Path, prompts: list[str]) -> Path:
    """A local file in smoltalk's own schema, one conversation per prompt."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"Reply {i}."}],
             "source": "tests"} for i, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def micro_data(sft: list[dict] | None = None, **top: object) -> dict:
    """The micro experiment's `data` config as a mapping, its SFT split given as `sft` (a mixture)."""
    data = OmegaConf.to_container(compose_micro().data, resolve=True)
    if sft is not None:
        data["mixtures"]["sft"] = sft
    return data | top


def mixture(file: Path, generated: dict, from_file: dict) -> list[dict]:
    return [{"source": "generated", **generated},
            {"source": "files", "adapter": "smoltalk", "data_files": str(file), **from_file}]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_smoltalk(tmp_path_factory.mktemp("hub") / "smoltalk.jsonl", [f"Question {i}?" for i in range(100)])


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The all-generated micro splits, for comparison."""
    out = tmp_path_factory.mktemp("gen") / "prepared"
    prepare(micro_data(), out, progress=False)
    return out


def test_a_two_source_sft_mixture_prepares_with_the_expected_counts_and_its_leak_check_holds(
        tmp_path, chats, generated):
    assert mixture_counts([MixtureSource(weight=3), MixtureSource(weight=1)], SFT_SIZE) == [225, 75]
    metrics = prepare(micro_data(mixture(chats, {"weight": 3}, {"weight": 1})), tmp_path / "mix", progress=False)

    rows = load_split(tmp_path / "mix", "sft")
    from_file = [r for r in rows if r["family"] == "smoltalk"]
    assert len(rows) == SFT_SIZE and len(from_file) == 75
    assert all(r["family"] in FAMILIES for r in rows if r["family"] != "smoltalk")
    assert len({r["messages"][0]["content"] for r in from_file}) == 75  # drawn without replacement
    assert {r["messages"][0]["content"] for r in from_file} <= {f"Question {i}?" for i in range(100)}
    assert [r["family"] == "smoltalk" for r in rows[:20]] != [False] * 20  # shuffled together, not appended
    assert metrics["leaked_keys"] == 0 and metrics["sft_rows"] == SFT_SIZE
    assert {k: v for k, v in metrics.items() if k.startswith("sft_source")} == {
        "sft_source0_rows": 225, "sft_source1_rows": 75, "sft_source1_skipped": 0, "sft_source1_too_long": 0}

    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    entries = manifest["mixtures"]["sft"]
    assert [(e["source"], e["weight"], e["drawn"]) for e in entries] == [("generated", 3, 225), ("files", 1, 75)]
    assert entries[1] | {"read": 100, "skipped": 0, "too_long": 0} == entries[1]
    assert list(manifest["mixtures"]) == ["sft"] and "sources" not in manifest
    assert manifest["counts"]["sft"] == SFT_SIZE
    assert manifest["per_family"]["sft"]["smoltalk"] == 75
    for split, name in SPLIT_FILES.items():  # the other splits are exactly the all-generated ones
        if split != "sft":
            assert (tmp_path / "mix" / name).read_bytes() == (generated / name).read_bytes(), split


def test_a_mixture_is_seeded(tmp_path, chats):
    sft = mixture(chats, {"weight": 3}, {"weight": 1})
    for out, seed in (("a", 1234), ("b", 1234), ("c", 99)):
        prepare(micro_data(sft, seed=seed), tmp_path / out, progress=False)
    sft_file = SPLIT_FILES["sft"]
    assert (tmp_path / "a" / sft_file).read_bytes() == (tmp_path / "b" / sft_file).read_bytes()

    def drawn(out: str) -> list[str]:
        return [r["messages"][0]["content"] for r in load_split(tmp_path / out, "sft") if r["family"] == "smoltalk"]

    assert set(drawn("a")) != set(drawn("c"))  # another seed draws other file rows...
    assert drawn("a") != drawn("c")  # ...in another order


def test_rows_entries_and_the_rounding_rule():
    """rows are taken as given; weights share what is left by largest remainder, ties to the earlier entry."""
    w, r = (lambda x: MixtureSource(weight=x)), (lambda n: MixtureSource(rows=n))
    assert mixture_counts([w(1), w(1), w(1)], 10) == [4, 3, 3]
    assert mixture_counts([r(4), w(1), w(2)], 10) == [4, 2, 4]
    assert mixture_counts([w(2), w(1)], 7) == [5, 2]  # 4.67, 2.33: the larger remainder rounds up
    assert mixture_counts([r(5), r(7)], 100) == [5, 7]  # rows only: the split has their sum


def test_a_file_row_that_leaks_an_eval_problem_is_caught(tmp_path, generated):
    asked = load_split(generated, "eval")[0]["prompt"]
    leaky = write_smoltalk(tmp_path / "leaky.jsonl", ["Question 1?", f"  {asked.upper()} ", "Question 2?"])
    with pytest.raises(RuntimeError, match="leakage audit found 1 "):
        prepare(micro_data(mixture(leaky, {"weight": 1}, {"rows": 3})), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_file_with_too_few_rows_for_its_share_is_refused(tmp_path, chats):
    with pytest.raises(ValueError, match=r"data\.mixtures\.sft\[1\] \(smoltalk: .*smoltalk\.jsonl.*\) has 100 usable "
                                         r"rows, fewer than the 150 the mixture draws from it"):
        prepare(micro_data(mixture(chats, {"weight": 1}, {"weight": 1})), tmp_path / "out", progress=False)


@pytest.mark.parametrize(("sft", "error"), [
    ([{"source": "generated", "weight": 0}], r"data\.mixtures\.sft\[0\]\.weight is 0: it must be positive"),
    ([{"source": "generated", "weight": -1.5}], r"data\.mixtures\.sft\[0\]\.weight is -1\.5: it must be positive"),
    ([{"source": "generated", "weight": 1, "rows": 10}], r"data\.mixtures\.sft\[0\] needs exactly one of weight .* "
                                                         r"or rows .*: it has both"),
    ([{"source": "generated"}], r"data\.mixtures\.sft\[0\] needs exactly one of weight .*: it has neither"),
    ([{"source": "generated", "weight": 1}, {"source": "web", "weight": 1}],
     r"data\.mixtures\.sft\[1\]\.source 'web' is unknown: choose one of generated, hub, files"),
    ([{"source": "generated", "weight": 1}, {"source": "files", "adapter": "gsm8k", "data_files": "x.jsonl",
                                             "weight": 1}],
     r"data\.mixtures\.sft\[1\]\.adapter 'gsm8k' makes problem rows but sft holds chat rows"),
    ([{"source": "generated", "weight": 1}, {"source": "generated", "rows": 5}],
     r"data\.mixtures\.sft\[1\] is a second generated entry"),
    ([{"source": "generated", "weight": 1}, {"source": "files", "adapter": "smoltalk", "data_files": "x.jsonl",
                                             "rows": 300}],
     r"data\.mixtures\.sft: its rows entries sum to 300, leaving nothing of data\.sizes\.sft \(300\)"),
    ([{"source": "generated", "weight": 1, "ratio": 2}],
     r"data\.mixtures\.sft\[0\]\.ratio is not a setting of data\.mixtures\.sft\[0\]"),
    ([], r"data\.mixtures\.sft is an empty list"),
    ({"source": "generated", "weight": 1}, r"data\.mixtures\.sft must be a list of sources"),
])
def test_bad_mixtures_are_refused_naming_the_field(sft, error):
    with pytest.raises(ValueError, match=error):
        DataConfig.parse(micro_data(sft))


def test_a_mixture_over_a_split_read_from_files_is_refused_naming_both_fields(chats):
    data = micro_data(mixture(chats, {"weight": 3}, {"weight": 1}))
    data["sources"]["sft"] = {"source": "files", "adapter": "smoltalk", "data_files": str(chats)}
    with pytest.raises(ValueError, match=r"data\.mixtures\.sft and data\.sources\.sft \(source files\) both say "
                                         r"where sft comes from: .* set data\.sources\.sft\.source back to generated, "
                                         r"or set data\.mixtures\.sft to null"):
        DataConfig.parse(data)


def test_a_missing_mixture_file_is_refused_before_any_work(tmp_path):
    cfg = DataConfig.parse(micro_data(mixture(tmp_path / "nowhere.jsonl", {"weight": 3}, {"weight": 1})))
    with pytest.raises(FileNotFoundError, match=rf"data\.mixtures\.sft\[1\]\.data_files names "
                                                rf"{re.escape(str(tmp_path))}/nowhere\.jsonl"):
        check_sources(cfg)


SFT_MIXTURE = ("data.mixtures.sft=[{source: generated, weight: 3}, "
               "{source: files, adapter: smoltalk, data_files: chats.jsonl, weight: 1}]")


def test_a_mixture_composes_from_the_command_line_as_written(tmp_path):
    """conf/ sets data.mixtures.<split> to null, which Hydra merges a list over (no ~ or + needed), both when
    composing (python -m pipeline) and when writing params.yaml (dvc exp run -S, python -m pipeline.config)."""
    from pipeline.config.load import load_params, write_params

    composed = compose_micro(SFT_MIXTURE)
    written = load_params(write_params(["experiment=micro", SFT_MIXTURE], tmp_path / "params.yaml"))
    for cfg in (composed, written):
        assert [e["source"] for e in cfg.data.mixtures.sft] == ["generated", "files"]
        data = DataConfig.parse(cfg.data)
        assert [(e.source, e.weight) for e in data.mixtures.sft] == [("generated", 3), ("files", 1)]
        assert list(data.mixtures.splits()) == ["sft"] and data.sources.external() == {}
        assert [where for where, _ in data.entries("sft")] == ["data.mixtures.sft[0]", "data.mixtures.sft[1]"]


def test_no_mixture_is_the_default():
    data = DataConfig.parse(compose_micro().data)
    assert data.mixtures.splits() == {} and data.mixtures == MixturesConfig()
    assert OmegaConf.to_container(compose_micro().data.mixtures) == MixturesConfig().to_dict()
    assert [where for where, _ in data.entries("sft")] == ["data.sources.sft"]


def test_an_eval_mixture_is_the_same_for_every_training_seed(tmp_path):
    gsm8k = Path(__file__).parent / "fixtures" / "hub" / "gsm8k.jsonl"  # rows 0-2 well-formed
    eval_mix = [{"source": "generated", "weight": 1},
                {"source": "files", "adapter": "gsm8k", "data_files": str(gsm8k), "max_rows": 3, "rows": 3}]
    outs = []
    for seed in (1234, 99):
        data = micro_data(seed=seed)
        data["mixtures"]["eval"] = eval_mix
        metrics = prepare(data, tmp_path / str(seed), progress=False)
        assert (metrics["eval_rows"], metrics["eval_source0_rows"], metrics["eval_source1_rows"]) == (40, 37, 3)
        assert metrics["leaked_keys"] == 0
        outs.append((tmp_path / str(seed) / SPLIT_FILES["eval"]).read_bytes())
    assert outs[0] == outs[1]
