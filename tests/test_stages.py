"""Every stage on the micro config, in-process: outputs exist, numbers move, hand-offs are checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.datamodules import ChatData
from pipeline.data.tokenizer import IGNORE_INDEX
from pipeline.evaluation.figures import load_curves
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt, load_into, load_reward_model
from pipeline.model.heads import ScalarHead
from stages import registry


def metrics(stage: str) -> dict:
    return json.loads(Path(f"metrics/{stage}.json").read_text())


def test_every_stage_wrote_what_its_spec_declares(in_chain):
    for stage in registry():
        for path in stage.spec.made():
            assert path.exists(), f"stage {stage.name} declares {path} but did not write it"
        for ckpt in stage.spec.writes:
            assert (ckpt.path / "model.safetensors").is_file() and (ckpt.path / "meta.json").is_file()
            meta = json.loads((ckpt.path / "meta.json").read_text())
            assert (meta["name"], meta["kind"]) == (ckpt.name, ckpt.kind)
    assert Path("data/prepared/sft.jsonl").is_file() and Path("artifacts/tokenizer/tokenizer.json").is_file()
    assert not list(Path("artifacts").glob(".*tmp*")), "a temporary output was left behind"


def test_pretrain_loss_fell(in_chain):
    m = metrics("pretrain")
    assert m["train_loss"] < m["first_train_loss"]
    assert m["val_loss"] < m["ln_vocab"]


def test_each_stage_changed_the_weights(in_chain):
    weights = {n: load_file(f"artifacts/{n}/model.safetensors") for n in ("pretrain", "sft", "aligned")}
    for before, after in (("pretrain", "sft"), ("sft", "aligned")):
        changed = [k for k in weights[before] if not torch.equal(weights[before][k], weights[after][k])]
        assert changed, f"{after} has the same weights as {before}"


def test_checkpoints_record_their_config_and_tokenizer(in_chain):
    meta = json.loads(Path("artifacts/sft/meta.json").read_text())
    tok_sha = json.loads(Path("artifacts/pretrain/meta.json").read_text())["tokenizer_sha256"]
    assert meta["kind"] == "gpt" and meta["tokenizer_sha256"] == tok_sha and meta["model"]["n_layer"] == 2
    model, _ = load_gpt("sft", tok_sha)
    assert isinstance(model, GPT)


def test_a_checkpoint_from_another_tokenizer_is_refused(in_chain):
    with pytest.raises(ValueError, match="rerun the stages after `tokenizer`"):
        load_gpt("sft", "0" * 64)


def test_a_reward_checkpoint_is_not_taken_for_a_language_model(in_chain):
    with pytest.raises(ValueError, match="holds a 'reward'"):
        load_gpt("reward")
    with pytest.raises(ValueError, match="expected 'reward'"):
        load_into("sft", ScalarHead(load_gpt("sft")[0]), "reward")
    rm = load_reward_model(load_gpt("sft")[0].config)
    assert rm.likelihood_term == bool(json.loads(Path("artifacts/reward/meta.json").read_text())["likelihood_term"])


def test_sft_batches_put_loss_only_on_answers(in_chain):
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.paths import PREPARED

    from conftest import compose_micro

    tok = load_tokenizer(compose_micro().tokenizer.special_tokens)
    data = ChatData(PREPARED, tok, 128, 4, seed=0)
    data.setup()
    batches = list(data.train_dataloader())
    for batch in batches[:3]:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            assert ids[first] == tok.assistant_id  # the first supervised prediction follows <|assistant|>
            assert tok.end_id in labels and tok.user_id not in [t for t in labels if t != IGNORE_INDEX]
    # grouped by length: an epoch is every row once, and a batch pads far less than a random one would
    lengths = sorted(len(ids) for ids, _ in data.train_set)
    assert sum(b["input_ids"].size(0) for b in batches) == len(data.train_set) // 4 * 4
    padding = sum(int((b["input_ids"] == tok.pad_id).sum()) for b in batches)
    random_padding = sum(4 * max(chunk) - sum(chunk) for chunk in
                         (lengths[i::len(lengths) // 4][:4] for i in range(len(lengths) // 4)))
    assert padding < random_padding / 2


def test_evaluate_table_has_every_checkpoint_and_metric(in_chain):
    table = metrics("evaluate")
    assert list(table) == [c.name for c in registry().checkpoints("gpt")] + ["verdict"]
    verdict = table.pop("verdict")
    assert verdict["method"] == "ppo" and verdict["exact_match_vs_sft"] == pytest.approx(
        table["aligned"]["exact_match"] - table["sft"]["exact_match"], abs=1e-6)
    for row in table.values():
        assert {"val_loss", "perplexity", "exact_match", "exact_match_fewshot", "exact_match_cot",
                "exact_match_hard", "exact_match_fewshot_hard", "exact_match_cot_hard", "fewshot_shots", "reward",
                "reward_greedy", "kl_to_sft"} <= set(row)
        assert 0.0 <= row["exact_match"] <= 1.0
    assert table["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)


def test_align_logs_trl_metric_names(in_chain):
    m = metrics("align")
    assert m["method"] == "ppo"
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac_avg", "loss/value_avg"):
        assert m[key] is not None, key
    rows = load_curves(Path("dvclive"), ["align"])["align_train"]  # DVCLive's step files, as the report reads them
    trained = [r for r in rows if "objective/scores" in r]  # the monitor's eval/ points have steps of their own
    assert len(trained) >= 2 and any("eval/exact_match" in r for r in rows)


def test_training_stages_record_their_device_and_tokens(in_chain):
    for stage in registry().trained():
        m = metrics(stage)
        assert m["device"].startswith("cpu (") and m["tokens"] > 0, (stage, m.get("device"), m.get("tokens"))
    assert metrics("pretrain")["tokens"] == metrics("pretrain")["tokens_seen"]  # fixed-size windows: every token
    report = Path("reports/report.md").read_text()
    assert f"| pretrain | {metrics('pretrain')['run_id']} | {metrics('pretrain')['device']} |" in report
    assert all(Path(f"reports/figures/{n}.png").is_file() for n in ("loss_curves", "accuracy", "alignment"))
