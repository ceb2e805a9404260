"""LoRA through peft (`peft=lora`): adapters train and nothing else of the backbone, checkpoints are saved merged
and plain, alignment's reference is the policy with its adapters off, bad targets are refused before work, a
killed LoRA run resumes, and `peft=none` adds nothing.

The stages run in-process in one micro workspace (prepare, tokenizer, and a seeded micro GPT standing in for
the pretrained checkpoint: pretraining is not under test), then sft, reward and align with LoRA, rank 2.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from pipeline.config.model import GPTConfig
from pipeline.model import lora
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import response_logprobs, sequence_logprobs

from conftest import compose_micro, micro_config, seeded_workspace

RANK = 2
LORA = ("peft=lora", f"peft.r={RANK}", "trainer.progress_bar=false")
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # what all-linear matches in a GELU GPT
SHAPE = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


@contextmanager
def inside(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A micro workspace: prepared data, the tokenizer, and a seeded micro GPT as checkpoint `pretrain`."""
    return seeded_workspace(tmp_path_factory.mktemp("lora"), "trainer.progress_bar=false")


def run(work: Path, stage: str, *overrides: str) -> dict:
    from stages import run_stage
    with inside(work):
        return run_stage(stage, compose_micro(*LORA, *overrides))


@pytest.fixture(scope="module")
def sft(work) -> dict:
    return run(work, "sft")


@pytest.fixture(scope="module")
def reward(work, sft) -> dict:
    return run(work, "reward")


def weights(work: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(work / "artifacts" / name / "model.safetensors"))


def meta(work: Path, name: str) -> dict:
    return json.loads((work / "artifacts" / name / "meta.json").read_text())


def targeted(key: str, prefix: str = "") -> bool:
    return key.startswith(prefix) and any(key.endswith(f"{t}.weight") for t in TARGETS)


def assert_low_rank_update(before: dict, after: dict, prefix: str = "", moved: bool = True) -> None:
    """Only the targeted Linear weights changed, each by a matrix of rank <= RANK (B A, merged)."""
    assert sorted(before) == sorted(after)
    changed = 0
    for key, w in after.items():
        if not targeted(key, prefix):
            assert torch.equal(w, before[key]), f"{key} is not an adapter target but changed"
            continue
        delta = (w.double() - before[key].double())
        if delta.abs().max() > 0:
            changed += 1
            s = torch.linalg.svdvals(delta)
            assert int((s > s[0] * 1e-4).sum()) <= RANK, f"{key}: an update of rank > {RANK}"
    assert changed > 0 or not moved, "no adapter moved"


# ------------------------------------------------------------------ the stages with LoRA

def test_sft_trains_adapters_only_and_saves_a_plain_merged_model(work, sft):
    from pipeline.model.handoff import load_gpt
    assert sft["params_trainable"] / sft["params_total"] < 0.1
    m = meta(work, "sft")
    assert m["params_trainable"] == sft["params_trainable"] and m["peft"]["name"] == "lora" and m["peft"]["r"] == RANK
    with inside(work):
        model, _ = load_gpt("sft")  # a plain GPT: the keys and shapes of one
    assert sorted(model.state_dict()) == sorted(GPT(model.config).state_dict())
    assert m["n_params"] == sum(p.numel() for p in model.parameters())
    # the base stayed frozen: only the targeted matrices moved, each by a rank-r update (adapters changed)
    assert_low_rank_update(weights(work, "pretrain"), weights(work, "sft"))


def test_the_control_trains_adapters_as_sft_did(work, sft, reward):
    aligned = run(work, "align")  # the control trains as many steps as the aligned weights had updates
    metrics = run(work, "sft_control")
    assert metrics["steps"] == aligned["policy_updates"] > 0
    assert metrics["params_trainable"] == sft["params_trainable"] and meta(work, "sft_control")["peft"]["r"] == RANK
    assert_low_rank_update(weights(work, "sft"), weights(work, "sft_control"))


def test_reward_trains_backbone_adapters_and_the_whole_head(work, sft, reward):
    from pipeline.model.handoff import load_reward_model
    with inside(work):
        config = GPTConfig.from_dict(meta(work, "reward")["model"])
        rm = load_reward_model(config)  # plain: loads into a ScalarHead without adapters
    # the backbone's adapters (as many as SFT's: the same shape and targets) + the head (weight, bias) + lm_scale
    assert reward["params_trainable"] == sft["params_trainable"] + config.n_embd + 1 + 1
    assert rm.likelihood_term and meta(work, "reward")["peft"]["name"] == "lora"
    sft_w, rm_w = weights(work, "sft"), weights(work, "reward")
    backbone = {k.removeprefix("backbone."): v for k, v in rm_w.items() if k.startswith("backbone.")}
    assert_low_rank_update(sft_w, backbone)
    assert all(torch.equal(rm_w[f"frozen_lm.{k}"], v) for k, v in sft_w.items())  # the likelihood copy: SFT's


@pytest.mark.parametrize("method", ["dpo", "ppo", "grpo"])
def test_align_with_lora_saves_a_plain_policy_and_loads_no_second_copy(work, reward, method, monkeypatch):
    import pipeline.alignment.align as align_module
    from pipeline.model.handoff import load_gpt

    loads = []
    monkeypatch.setattr(align_module, "load_gpt", lambda *a, **k: loads.append(a) or load_gpt(*a, **k))
    metrics = run(work, "align", f"align={method}")
    assert len(loads) == 1, "with LoRA the reference is the policy with its adapters off, not a second load"
    assert metrics["params_trainable"] / metrics["params_total"] < 0.1
    with inside(work):
        policy, m = load_gpt("aligned")
    assert m["method"] == method and m["peft"]["stages"] == ["sft", "reward", "align"]
    assert sorted(policy.state_dict()) == sorted(GPT(policy.config).state_dict())
    # grpo's checker rewards a random micro model's answers 0 everywhere: no advantage, nothing moves
    assert_low_rank_update(weights(work, "sft"), weights(work, "aligned"), moved=method == "dpo")
    if method == "ppo":  # the first rollout's policy is the reference: KL 0 (B = 0 at the start)
        assert abs(metrics["objective/kl_first"]) < 1e-5


# ------------------------------------------------------------------ the pieces, in memory

def random_adapters(model: torch.nn.Module) -> None:
    """Give every B matrix values, as training would (B = 0 at the start makes the adapters a no-op)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_merged_weights_give_the_adapter_models_logits():
    torch.manual_seed(0)
    cfg = micro_config(*LORA).peft
    model = lora.add_adapters(GPT(SHAPE), cfg)
    random_adapters(model)
    x = torch.randint(0, SHAPE.vocab_size, (3, 20))
    with torch.no_grad():
        want = model.eval()(x)
        from_state = lora.merged_gpt(model, {k: v.clone() for k, v in model.state_dict().items()}).eval()(x)
        merged = lora.merge(model)
        got = merged(x)
    assert type(merged) is GPT and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_state, want, atol=1e-5, rtol=0)
    assert (want - GPT(SHAPE).eval()(x)).abs().max() > 1e-3  # the adapters did change the output


def test_the_reference_is_the_base_model_with_the_adapters_off():
    from pipeline.inference.sequences import build_sequences

    torch.manual_seed(0)
    base = GPT(SHAPE).eval()
    policy = lora.add_adapters(copy.deepcopy(base), micro_config(*LORA).peft).train()
    random_adapters(policy)
    reference = lora.AdaptersOff(policy)
    seq, attn, mask, P = build_sequences([[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10]], pad_id=0)
    with torch.no_grad():
        ref, _ = response_logprobs(reference, seq, attn, P)
        want, _ = response_logprobs(base, seq, attn, P)
        adapted, _ = response_logprobs(policy, seq, attn, P)
        ref_seq = sequence_logprobs(reference, seq, torch.cat([torch.zeros_like(seq[:, :P]), mask], 1).float())
        want_seq = sequence_logprobs(base, seq, torch.cat([torch.zeros_like(seq[:, :P]), mask], 1).float())
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref_seq, want_seq, atol=1e-5, rtol=0)
    assert (adapted - want).abs().max() > 1e-3  # outside the context the adapters are on again
    assert policy.training and all(m.training for m in policy.modules())  # its mode restored
    assert list(reference.parameters()) == [] and reference.state_dict() == {}


def test_the_optimizers_get_the_adapters_only():
    from pipeline.alignment import methods
    from pipeline.alignment.methods import dpo, ppo
    from pipeline.model.heads import ScalarHead
    from pipeline.training.lm import SupervisedFinetuning

    def adapter_ids(model):
        return {id(p) for n, p in model.named_parameters() if "lora_" in n}

    def optimized(module) -> list[set[int]]:
        opt = module.configure_optimizers()["optimizer"]
        return [{id(p) for p in g["params"]} for g in opt.param_groups]

    torch.manual_seed(0)
    cfg = micro_config(*LORA)
    policy = lora.add_adapters(GPT(SHAPE), cfg.peft)
    groups = optimized(SupervisedFinetuning(policy, cfg.sft.optim, 4))
    assert set().union(*groups) == adapter_ids(policy) and len(adapter_ids(policy)) == 4 * 2 * SHAPE.n_layer
    _, dcfg = methods.load(micro_config(*LORA, "align=dpo"))
    assert set().union(*optimized(dpo.DPO(policy, lora.AdaptersOff(policy), dcfg))) == adapter_ids(policy)
    _, pcfg = methods.load(micro_config(*LORA, "align=ppo"))
    critic, rm = ScalarHead(GPT(SHAPE)), ScalarHead(GPT(SHAPE))
    policy_group, critic_group = optimized(ppo.PPO(policy, lora.AdaptersOff(policy), critic, rm, None, pcfg, 0))
    assert policy_group == adapter_ids(policy) and critic_group == {id(p) for p in critic.parameters()}


# ------------------------------------------------------------------ refusals, resume, and peft=none

@pytest.mark.parametrize(("stage", "overrides", "message"), [
    ("sft", ("peft.target_modules=[c_attn,c_atn]",),
     "peft.target_modules ['c_attn', 'c_atn']: c_atn matches no Linear layer of the model; its Linear layers are "
     "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head"),
    ("align", ("peft.target_modules=[attn]",), "attn matches no Linear layer of the model"),
    ("reward", ("peft.target_modules=[lm_head]",), "peft.target_modules has lm_head, whose weight is the token "
                                                    "embedding's (model.tie_embeddings)"),
    ("sft", ("peft.stages=[sft,rewrd]",), "peft.stages ['sft', 'rewrd']: rewrd is not a stage that can train "
                                          "adapters: choose among sft, reward, align"),
])
def test_bad_adapter_settings_stop_the_stage_before_work(work, sft, stage, overrides, message, capsys):
    from pipeline.harness.runner import exit_codes
    from stages import registry

    written = [work / p for p in registry()[stage].spec.made() if (work / p).exists()]
    resume = work / "outputs" / "resume" / stage  # a finished stage keeps its final state there
    written += [resume] if resume.exists() else []
    before = {p: (p.stat().st_mtime_ns if p.is_file() else sorted(q.stat().st_mtime_ns for q in p.rglob("*")))
              for p in written}
    with pytest.raises(SystemExit) as stop, exit_codes(stage):
        run(work, stage, *overrides)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    after = {p: (p.stat().st_mtime_ns if p.is_file() else sorted(q.stat().st_mtime_ns for q in p.rglob("*")))
             for p in written}
    assert after == before  # no output, and no resume state, was touched


def test_a_killed_lora_run_resumes_to_the_uninterrupted_result(work, sft, tmp_path, monkeypatch, capsys):
    """Resume checkpoints hold the peft-wrapped module (adapters and optimizer state of the adapters only)."""
    from pipeline.training.lm import LanguageModeling

    copy_dir = tmp_path / "resumed"
    shutil.copytree(work, copy_dir, ignore=shutil.ignore_patterns("outputs", "wandb"))
    healthy = LanguageModeling.training_step

    def poisoned(self, batch, batch_idx):  # micro: a resume checkpoint every 2 steps; NaN from step 5 on
        loss = healthy(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 4 else loss

    monkeypatch.setattr(LanguageModeling, "training_step", poisoned)
    with pytest.raises(FloatingPointError):
        run(copy_dir, "sft")
    monkeypatch.setattr(LanguageModeling, "training_step", healthy)
    resumed = run(copy_dir, "sft")
    assert "resuming sft from outputs/resume/sft/step-00000004.ckpt" in capsys.readouterr().err
    assert resumed["val_loss"] == pytest.approx(sft["val_loss"], abs=1e-6)
    for key, w in weights(work, "sft").items():
        torch.testing.assert_close(weights(copy_dir, "sft")[key], w, atol=1e-6, rtol=0)


def test_peft_none_adds_nothing(work, sft, tmp_path):
    """The default: every weight trains, and meta.json and the metrics hold no new key."""
    from stages import run_stage

    cfg = micro_config()
    assert not lora.applies(cfg.peft, "sft") and cfg.peft.to_dict() == {"name": "none"}
    full = tmp_path / "full"
    shutil.copytree(work, full, ignore=shutil.ignore_patterns("outputs", "wandb"))
    with inside(full):
        metrics = run_stage("sft", compose_micro("trainer.progress_bar=false"))
    assert not {"params_trainable", "params_total", "peft"} & (set(metrics) | set(meta(full, "sft")))
    before, after = weights(work, "pretrain"), weights(full, "sft")
    assert not any(torch.equal(before[k], after[k]) for k in ("wpe.weight", "h.0.ln_1.weight", "h.1.mlp.c_fc.bias"))


def test_all_linear_targets_every_block_linear_of_either_mlp():
    """`all-linear` (the default) adapts SwiGLU's gate too, and never the LM head; a list is taken as written."""
    from pipeline.config.peft import LoraConfig
    from pipeline.model.lora import targets
    lora = LoraConfig(name="lora", stages=("sft",))
    llama = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, pos_encoding="rope",
                      norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
    assert targets(lora, SHAPE) == list(TARGETS)
    assert targets(lora, llama) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj"]
    assert targets(LoraConfig(name="lora", stages=("sft",), target_modules=("c_attn",)), llama) == ["c_attn"]
    with pytest.raises(ValueError, match="all-linear already names every Linear"):
        LoraConfig.parse({"name": "lora", "stages": ["sft"], "target_modules": ["all-linear", "c_attn"]})
