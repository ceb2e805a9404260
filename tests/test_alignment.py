"""Alignment losses against hand-computed values, KL = 0 at the reference, masking, and real DPO/GRPO updates."""
from __future__ import annotations

import math
import re

import pytest
import torch

from pipeline.alignment import methods
from pipeline.alignment.methods.dpo import dpo_loss
from pipeline.alignment.methods.grpo import group_advantages
from pipeline.alignment.rollout import clipped_policy_loss, kl_penalty, masked_mean
from pipeline.config.model import GPTConfig
from pipeline.inference.sequences import build_sequences
from pipeline.model.gpt import GPT
from pipeline.model.logprobs import response_logprobs, sequence_logprobs
from pipeline.registry import StageSpec
from pipeline.training.reward import pairwise_stats

TEST_STAGE = StageSpec(name="align_test", desc="a test of one alignment objective")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_by_hand():
    s = pairwise_stats(torch.tensor([1.5, 0.0]), torch.tensor([0.5, 2.0]))
    assert float(s["loss"]) == pytest.approx(-(_log_sigmoid(1.0) + _log_sigmoid(-2.0)) / 2, rel=1e-6)
    assert float(s["margin"]) == pytest.approx(-0.5) and float(s["accuracy"]) == 0.5


def test_dpo_sigmoid_loss_by_hand():
    # policy - reference log-ratios: chosen +1.0 and -0.5, rejected -1.0 and +0.5; beta 0.5
    out = dpo_loss(torch.tensor([-2.0, -3.5]), torch.tensor([-6.0, -4.5]), torch.tensor([-3.0, -3.0]),
                   torch.tensor([-5.0, -5.0]), beta=0.5)
    torch.testing.assert_close(out["chosen"], torch.tensor([0.5, -0.25]))
    torch.testing.assert_close(out["rejected"], torch.tensor([-0.5, 0.25]))
    expected = torch.tensor([-_log_sigmoid(1.0), -_log_sigmoid(-0.5)])
    torch.testing.assert_close(out["loss"], expected)
    # conservative DPO: label trusted with probability 0.9
    smooth = dpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-5.0]),
                      beta=0.5, label_smoothing=0.1)["loss"]
    assert float(smooth) == pytest.approx(-0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0), rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    lp = torch.tensor([-3.0, -7.0])
    out = dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)
    torch.testing.assert_close(out["loss"], torch.full((2,), math.log(2.0)))


def test_clipped_policy_objective_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    loss, ratio = clipped_policy_loss(logp, old, adv, cliprange=0.2)
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    # A>0, r=1.5: clipped at 1.2 -> -1.2; A<0, r=0.5: max(0.5, 0.8) -> 0.8; inside the range -> -A r;
    # A>0, r=0.7 below the range: the unclipped -0.7 is the larger (pessimistic) term
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -2.2, -0.7]]))


def test_clipped_objective_has_no_gradient_once_clipped():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[1.0]]), cliprange=0.2)
    loss.sum().backward()
    assert float(logp.grad) == 0.0


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(math.log(2.0))
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx((0.5 - 1) + math.log(2.0))


def test_kl_is_zero_when_the_policy_is_the_reference():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    seq, attn, mask, P = build_sequences([[1, 2], [3, 4, 5]], [[6, 7, 8], [9]], pad_id=0)
    lp, _ = response_logprobs(m, seq, attn, P)
    for est in ("k1", "k3"):
        assert float(masked_mean(kl_penalty(lp, lp.clone(), est).abs(), mask)) == 0.0


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    centred = group_advantages(r, 4, scale=False)
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    scaled = group_advantages(r, 4, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()
    assert float(scaled[0]) == pytest.approx(0.75 / (std + 1e-4), rel=1e-5)
    assert float(scaled[4:].abs().sum()) == 0.0  # a group that all scored the same gives no signal


def test_padding_never_reaches_sequence_logprobs():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])  # prompt [1, 2], response [3, 4, 5]
    alone = sequence_logprobs(m, ids, mask)
    for pad in (0, 7, 39):  # whatever the pad token is, right padding changes nothing
        padded = torch.tensor([[1, 2, 3, 4, 5, pad, pad, pad]])
        pmask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
        torch.testing.assert_close(sequence_logprobs(m, padded, pmask), alone)
    # and the masked-out prompt tokens are not counted
    logp = torch.log_softmax(m(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(alone, logp[:, 1:].sum(1))


def policy_updates(*overrides: str) -> int:
    from conftest import micro_config
    method, acfg = methods.load(micro_config(*overrides))
    return method.policy_updates(acfg)


def test_policy_updates_per_method():
    # steps x epochs x minibatches (critic warmup not counted)
    assert policy_updates("align.steps=3", "align.rollout_batch=8", "align.minibatch_size=4") == 3 * 1 * 2
    assert policy_updates("align=dpo", "align.steps=7") == 7
    assert policy_updates("align=grpo", "align.steps=5", "align.rollout_batch=4", "align.group_size=4",
                          "align.minibatch_size=8", "align.epochs=2") == 5 * 2 * 2


@pytest.mark.parametrize("override, field", [
    (("align.method=sft",), "align.method 'sft' is unknown: choose one of dpo, grpo, kto, online_dpo, orpo, ppo, "
                                    "reinforce_pp, rloo"),
    (("align=dpo", "align.beta=0"), "align.beta is 0: it must be positive"),
    (("align=grpo", "align.group_size=1"), "align.group_size is 1: it must be >= 2"),
    (("align=grpo", "align.minibatch_size=100000"), "align.minibatch_size (100000) must be <= align.rollout_batch"),
    (("align=ppo", "align.kl_estimator=k2"), "align.kl_estimator 'k2' is unknown: choose k1 or k3"),
    (("align=ppo", "+align.kl_coeff=0.1"), "align.kl_coeff is not a setting of align: did you mean align.kl_coef?"),
    (("align=dpo", "align.on_policy.max_new_tokens=125"), "align.on_policy.max_new_tokens (125) leaves no room"),
])
def test_bad_align_config_names_the_field(override, field):
    from conftest import micro_config
    with pytest.raises(ValueError, match=re.escape(field)):
        methods.load(micro_config(*override))


def _frozen_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_dpo_step_moves_the_policy_and_not_the_reference(in_chain):
    from pipeline.alignment.methods.dpo import DPO
    from pipeline.data.datamodules import PreferenceData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.paths import PREPARED
    from pipeline.training.trainer import fit

    from conftest import micro_config

    cfg = micro_config("align=dpo", "align.steps=1", "align.batch_size=4", "align.val_every=1", "align.val_batches=1")
    _, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, reference = load_gpt("sft")[0], load_gpt("sft")[0]
    before, ref_before = _frozen_copy(policy), _frozen_copy(reference)
    data = PreferenceData(PREPARED, tok, policy.config.block_size, 4, 0, 0.1)
    _, curves, final = fit(DPO(policy.train(), reference, acfg), data, cfg, TEST_STAGE, max_steps=1,
                           val_every=1, val_batches=1)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    # step 1 starts at policy == reference: every implicit reward is 0, the loss is log 2
    assert curves.train[0]["train/loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert "val/rewards/accuracies" in final


def test_one_grpo_iteration_moves_the_policy_with_checker_rewards(in_chain):
    from pipeline.alignment.methods.grpo import GRPO
    from pipeline.data.datamodules import PromptData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.paths import PREPARED
    from pipeline.training.trainer import fit

    from conftest import micro_config

    cfg = micro_config("align=grpo", "align.steps=1", "align.rollout_batch=4", "align.group_size=4",
                       "align.minibatch_size=16", "align.max_new_tokens=6", "align.kl_coef=0.1")
    _, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, reference = load_gpt("sft")[0], load_gpt("sft")[0]
    before, ref_before = _frozen_copy(policy), _frozen_copy(reference)
    _, curves, _ = fit(GRPO(policy.train(), reference, tok, acfg, seed=0),
                       PromptData(PREPARED, 4, 1, 0), cfg, TEST_STAGE, validate=False, max_epochs=1, log_every=1)
    row = curves.train[0]
    assert 0.0 <= row["reward"] <= 1.0 and 0.0 <= row["frac_reward_zero_std"] <= 1.0
    # one on-policy step: the policy equals the reference while the KL is measured
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["clip_ratio"] == 0.0
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    if row["frac_reward_zero_std"] < 1.0:  # some group disagreed: there was a gradient
        assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_verdict_flags_reward_hacking_and_the_control():
    from pipeline.evaluation.evaluate import verdict
    base = {"exact_match": 0.5, "exact_match_sampled": 0.4, "reward": 1.0, "kl_to_sft": 0.0}
    results = {"sft": base, "sft_control": {**base, "exact_match": 0.55},
               "aligned": {**base, "exact_match": 0.45, "reward": 3.0, "kl_to_sft": 2.5}}
    v = verdict(results, "ppo", kl_bound=2.0)
    assert v["reward_hacking"] == 1 and v["beats_sft"] == 0 and v["kl_within_bound"] == 0
    results["aligned"] = {**base, "exact_match": 0.6, "exact_match_sampled": 0.5, "reward": 3.0, "kl_to_sft": 1.0}
    v = verdict(results, "ppo", kl_bound=2.0)
    assert (v["reward_hacking"], v["beats_sft"], v["beats_control"], v["kl_within_bound"]) == (0, 1, 1, 1)
    assert v["exact_match_vs_control"] == pytest.approx(0.05)


def test_every_method_module_has_its_config_file_and_interface():
    """A method is one module and one YAML: each is found by name, and each YAML composes into a valid config."""
    from pipeline.paths import CONF_DIR

    from conftest import micro_config
    assert methods.names() == sorted(p.stem for p in (CONF_DIR / "align").glob("*.yaml")) == [
        "dpo", "grpo", "kto", "online_dpo", "orpo", "ppo", "reinforce_pp", "rloo"]
    for name in methods.names():
        method, acfg = methods.load(micro_config(f"align={name}"))
        assert acfg.method == name == method.__name__.rpartition(".")[2]
        assert method.policy_updates(acfg) == method.updates_at(acfg, acfg.steps + getattr(acfg, "critic_warmup", 0))
        assert method.policy_updates(acfg) > 0 and method.SUMMARY and callable(method.train)
        assert set(method.NEEDS.values()) <= {"gpt", "reward"} and method.splits(acfg)
        assert methods.declared_needs(name) == method.NEEDS  # what dvc.yaml reads from the source, unimported


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    from pipeline.alignment.methods.ppo import AdaptiveKLController
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(kl=3.0, n=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(kl=0.9, n=10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))  # KL under target: beta falls
