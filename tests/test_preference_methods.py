"""The offline preference objectives beside DPO's sigmoid loss (IPO, SimPO, cDPO, KTO, ORPO): their losses against
hand-computed values, their variants' names, one real step each, and the whole align stage with each."""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from pipeline.alignment import methods
from pipeline.alignment.methods.dpo import dpo_loss, simpo_loss
from pipeline.alignment.methods.kto import UnpairedData, kto_loss, reference_point
from pipeline.alignment.methods.orpo import orpo_loss
from pipeline.config.model import GPTConfig
from pipeline.model.gpt import GPT
from pipeline.registry import StageSpec

TEST_STAGE = StageSpec(name="align_test", desc="a test of one alignment objective")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ losses by hand

def test_ipo_loss_by_hand():
    # policy - reference log-ratios: chosen +1.0 and -0.5, rejected -1.0 and +0.5, so h = 2.0 and -1.0;
    # beta 0.5: target 1 / (2 * 0.5) = 1, loss (2 - 1)^2 = 1 and (-1 - 1)^2 = 4
    out = dpo_loss(torch.tensor([-2.0, -3.5]), torch.tensor([-6.0, -4.5]), torch.tensor([-3.0, -3.0]),
                   torch.tensor([-5.0, -5.0]), beta=0.5, loss_type="ipo")
    torch.testing.assert_close(out["loss"], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(out["chosen"], torch.tensor([0.5, -0.25]))  # the rewards are DPO's
    # beta 1: at the target h = 1/2 the loss is 0, and it grows again past it, (2 - 1/2)^2 at h = 2 (DPO's falls)
    at = dpo_loss(torch.tensor([0.25]), torch.tensor([-0.25]), torch.zeros(1), torch.zeros(1), beta=1.0,
                  loss_type="ipo")
    past = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=1.0,
                    loss_type="ipo")
    assert float(at["loss"]) == pytest.approx(0.0) and float(past["loss"]) == pytest.approx(1.5 ** 2)


def test_simpo_loss_by_hand():
    # chosen: log-prob -2.0 over 4 tokens (average -0.5), rejected: -6.0 over 3 (average -2.0); beta 2.0:
    # rewards -1.0 and -4.0; gamma 0.5: loss = -log sigmoid(-1 + 4 - 0.5) = log(1 + exp(-2.5))
    out = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([4.0]), torch.tensor([3.0]),
                     beta=2.0, gamma=0.5)
    torch.testing.assert_close(out["chosen"], torch.tensor([-1.0]))
    torch.testing.assert_close(out["rejected"], torch.tensor([-4.0]))
    assert float(out["loss"]) == pytest.approx(math.log(1 + math.exp(-2.5)), rel=1e-6)


def test_cdpo_loss_by_hand():
    # log-ratios chosen +1.0, rejected -1.0, beta 0.5: logits 1.0; label trusted with probability 0.8:
    # loss = 0.8 * log(1 + exp(-1)) + 0.2 * log(1 + exp(1))
    out = dpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-5.0]),
                   beta=0.5, label_smoothing=0.2)
    assert float(out["loss"]) == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1)),
                                               rel=1e-6)


def test_kto_loss_by_hand():
    # log-ratios: desirable +1.0, undesirable -0.25; z0 0.25; beta 2.0: rewards 2.0 and -0.5, beta z0 0.5;
    # desirable: 1 * (1 - sigmoid(2.0 - 0.5)); undesirable: 1.5 * (1 - sigmoid(0.5 + 0.5))
    out = kto_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-4.25]), torch.tensor([-4.0]),
                   kl=torch.tensor(0.25), beta=2.0, desirable_weight=1.0, undesirable_weight=1.5)
    assert float(out["desirable"]) == pytest.approx(1 - 1 / (1 + math.exp(-1.5)), rel=1e-6)
    assert float(out["undesirable"]) == pytest.approx(1.5 * (1 - 1 / (1 + math.exp(-1.0))), rel=1e-6)
    torch.testing.assert_close(out["chosen"], torch.tensor([2.0]))
    torch.testing.assert_close(out["rejected"], torch.tensor([-0.5]))


def test_kto_reference_point_is_a_clamped_mean_without_gradient():
    x = torch.tensor([0.2, 0.6, -5.0], requires_grad=True)
    # rows of weight 0 left out: (0.2 + 0.6) / 2 = 0.4
    z0 = reference_point(x, torch.tensor([1.0, 1.0, 0.0]))
    assert float(z0) == pytest.approx(0.4) and not z0.requires_grad
    assert float(reference_point(torch.tensor([-1.0, 0.4]))) == 0.0  # mean -0.3, clamped at 0


def test_kto_mismatched_rows_put_each_response_after_the_next_pairs_prompt():
    data = UnpairedData(None, SimpleNamespace(pad_id=0), block_size=16, batch_size=2, seed=0, val_fraction=0.1)
    pairs = [(([1, 10, 11], 1), ([1, 12], 1)),           # prompt [1]: chosen [10, 11], rejected [12]
             (([2, 3, 20], 2), ([2, 3, 21, 22], 2))]     # prompt [2, 3]: chosen [20], rejected [21, 22]
    batch = data.collate(pairs)
    assert batch["kl_input_ids"].tolist() == [[2, 3, 10, 11], [1, 20, 0, 0], [2, 3, 12, 0], [1, 21, 22, 0]]
    assert batch["kl_response_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0]]
    assert batch["input_ids"].tolist()[0] == [1, 10, 11, 0]  # the batch itself is PreferenceData's


def test_orpo_loss_by_hand():
    # average log-probs: chosen log 0.5 (odds 1, log odds 0), rejected log 0.2 (odds 0.25);
    # log odds ratio = log 4; loss = -log 0.5 + 0.1 * -log sigmoid(log 4) = log 2 + 0.1 * log(1 + 1/4)
    out = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lambda_or=0.1)
    assert float(out["log_odds"]) == pytest.approx(math.log(4.0), rel=1e-5)
    assert float(out["nll"]) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(math.log(2.0) + 0.1 * math.log(1.25), rel=1e-5)
    # an answer the model is sure of (average log-prob 0) gives a finite loss, not inf
    assert torch.isfinite(orpo_loss(torch.zeros(1), torch.tensor([math.log(0.2)]), 0.1)["loss"]).all()


# ------------------------------------------------------------------ configs: the variants' names

@pytest.mark.parametrize(("overrides", "label"), [
    (("align=dpo",), "dpo"), (("align=dpo", "align.label_smoothing=0.1"), "cdpo"),
    (("align=dpo", "align.loss_type=ipo"), "ipo"), (("align=dpo", "align.loss_type=simpo"), "simpo"),
    (("align=kto",), "kto"), (("align=orpo",), "orpo"),
])
def test_each_variant_is_named_in_reports(overrides, label):
    from conftest import micro_config
    method, acfg = methods.load(micro_config(*overrides))
    assert acfg.label() == label and method.NEEDS == {} and method.policy_updates(acfg) == acfg.steps


def test_label_smoothing_is_refused_outside_the_sigmoid_loss():
    from conftest import micro_config
    with pytest.raises(ValueError, match="align.label_smoothing .0.1. is conservative DPO, a sigmoid loss"):
        methods.load(micro_config("align=dpo", "align.loss_type=ipo", "align.label_smoothing=0.1"))


class NeverCalled(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("a reference-free loss called the reference")


@pytest.mark.parametrize("overrides", [("align=dpo", "align.loss_type=simpo"), ("align=orpo",)])
def test_reference_free_losses_never_call_the_reference(overrides):
    from conftest import micro_config
    method, acfg = methods.load(micro_config(*overrides))
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    module = (method.DPO if acfg.method == "dpo" else method.ORPO)(policy, NeverCalled(), acfg)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]),
             "response_mask": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])}
    out = module.stats(batch)
    assert torch.isfinite(out["loss"]).all() and out["loss"].shape == (1,)


# ------------------------------------------------------------------ one real step each

def _frozen_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("overrides", "first_loss"), [
    (("align=dpo", "align.loss_type=ipo"), 0.25),  # policy == reference: h = 0, loss (0 - 1/2)^2 at beta 1
    (("align=kto",), 0.5),                         # r = z0 = 0: 1 - sigmoid(0) for every example
    (("align=orpo",), None),                       # an SFT loss: no fixed value at the start
])
def test_one_step_moves_the_policy_and_not_the_reference(in_chain, overrides, first_loss):
    from pipeline.alignment.methods import dpo, kto, orpo
    from pipeline.data.datamodules import PreferenceData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.paths import PREPARED
    from pipeline.training.trainer import fit

    from conftest import micro_config

    cfg = micro_config(*overrides, "align.steps=1", "align.batch_size=4", "align.val_every=1", "align.val_batches=1")
    _, acfg = methods.load(cfg)
    objective, data_type = {"dpo": (dpo.DPO, PreferenceData), "kto": (kto.KTO, kto.UnpairedData),
                            "orpo": (orpo.ORPO, PreferenceData)}[acfg.method]
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, reference = load_gpt("sft")[0], load_gpt("sft")[0]
    before, ref_before = _frozen_copy(policy), _frozen_copy(reference)
    data = data_type(PREPARED, tok, policy.config.block_size, 4, 0, 0.1)
    _, curves, final = fit(objective(policy.train(), reference, acfg), data, cfg, TEST_STAGE, max_steps=1,
                           val_every=1, val_batches=1)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    row = curves.train[0]
    if first_loss is not None:
        assert row["train/loss"] == pytest.approx(first_loss, abs=1e-5)
    if acfg.method == "kto":  # at the start the policy is the reference: no KL on the mismatched rows
        assert row["train/kl"] == pytest.approx(0.0, abs=1e-6)
    if acfg.method == "orpo":
        assert row["train/loss"] > row["train/nll_loss"] > 0  # the odds-ratio term adds to the NLL
    assert math.isfinite(row["train/loss"]) and "val/rewards/margins" in final


# ------------------------------------------------------------------ the whole align stage

@pytest.mark.parametrize(("overrides", "label"), [
    (("align=kto",), "kto"), (("align=orpo",), "orpo"), (("align=dpo", "align.loss_type=ipo"), "ipo"),
    (("align=dpo", "align.loss_type=simpo", "align.beta=2.0"), "simpo"),
])
def test_align_stage_trains_with_each_method(micro_chain, tmp_path, monkeypatch, overrides, label):
    from pipeline.model.handoff import load_gpt
    from pipeline.paths import checkpoint_dir
    from stages import run_stage

    from conftest import compose_micro

    shutil.copytree(micro_chain, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    shutil.rmtree(checkpoint_dir("aligned"))  # the chain's own (ppo's): what is read below is this run's
    metrics = run_stage("align", compose_micro(*overrides))
    assert metrics["method"] == label  # align records acfg.label(): the variant, not only the module
    sft, (aligned, meta) = load_gpt("sft")[0].state_dict(), load_gpt("aligned")
    assert meta["method"] == label
    aligned = aligned.state_dict()
    assert any(not torch.equal(sft[k], v) for k, v in aligned.items())
    assert metrics["policy_updates"] == 2 and math.isfinite(metrics["train/loss"])
