"""The online methods that score their own samples (rloo, reinforce_pp, online_dpo): their advantage and loss
arithmetic against hand-computed values, one real iteration each on the micro chain, and each as the align stage."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from pipeline.alignment import methods
from pipeline.alignment.methods.online_dpo import pair_loss, rank_pairs
from pipeline.alignment.methods.reinforce_pp import batch_advantages, token_rewards
from pipeline.alignment.methods.rloo import leave_one_out_advantages
from pipeline.alignment.rollout import clipped_policy_loss
from pipeline.registry import StageSpec
from pipeline.training.parallel import token_mean

TEST_STAGE = StageSpec(name="align_test", desc="a test of one online alignment objective")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_rloo_baseline_leaves_each_sample_out_and_reinforce_weighs_tokens_by_it():
    # group 1 (k=3): 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5. group 2: all equal, no signal
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    adv = leave_one_out_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # one update per rollout (ratio 1): the loss is the token mean of -A, so d loss / d logp = -A / tokens;
    # responses of 2, 1 and 1 tokens = 4 tokens: -(-3)/4 = 0.75 twice, -(-1.5)/4 = 0.375, -4.5/4 = -1.125
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    per_token, ratio = clipped_policy_loss(logp, logp.detach(), adv[:3, None], cliprange=0.2)
    token_mean(per_token, mask).backward()
    assert torch.equal(ratio, torch.ones(3, 2))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.75, 0.75], [0.375, 0.0], [-1.125, 0.0]]))


def test_reinforce_pp_folds_kl_into_the_reward_and_whitens_returns_over_the_batch():
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, 0.4, 9.0], [0.1, 9.0, 9.0]])  # 9s are past each response's end
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # kl_coef 0.5: row 0 = [-0.1, -0.2 + 1.0, 0]; row 1 = [-0.05 - 1.0, 0, 0] (the score lands on the last token)
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.8, 0.0], [-1.05, 0.0, 0.0]]))
    # gamma 0.5, returns-to-go: row 0 = [-0.1 + 0.5 * 0.8, 0.8] = [0.3, 0.8]; row 1 = [-1.05]
    # whitened over all 3 tokens of the batch: mean (0.3 + 0.8 - 1.05) / 3 = 0.05 / 3,
    # variance ((0.3 - m)^2 + (0.8 - m)^2 + (-1.05 - m)^2) / 3 = (0.080278 + 0.613611 + 1.137778) / 3 = 0.610556
    m, std = 0.05 / 3, math.sqrt(0.610556)
    adv = batch_advantages(rewards, mask, gamma=0.5)
    expected = torch.tensor([[(0.3 - m) / std, (0.8 - m) / std, 0.0], [(-1.05 - m) / std, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    # the baseline is the batch: a row's advantages move when another row's score does
    other = batch_advantages(token_rewards(torch.tensor([1.0, 3.0]), kl, mask, 0.5), mask, gamma=0.5)
    assert not torch.allclose(other[0, :2], adv[0, :2])


def test_online_dpo_ranks_pairs_drops_ties_and_takes_dpo_on_the_rest():
    # pairs (0.5, 2.0): the second is chosen; (1.0, 1.0): a tie; (3.0, -1.0): the first
    chosen, valid = rank_pairs(torch.tensor([0.5, 2.0, 1.0, 1.0, 3.0, -1.0]))
    assert chosen.tolist() == [1, 0, 0] and valid.tolist() == [True, False, True]
    logp = torch.tensor([[-4.0, -2.0], [-1.0, -3.0], [-1.0, -5.0]])
    ref = torch.tensor([[-3.0, -3.0], [-3.0, -1.0], [-2.0, -6.0]])
    out = pair_loss(logp, ref, chosen, beta=0.5, label_smoothing=0.0)
    # pair 0: chosen 0.5 * (-2 + 3) = 0.5, rejected 0.5 * (-4 + 3) = -0.5, margin 1 -> -log sigmoid(1)
    # pair 1 (tie, column 0): 0.5 * 2 = 1 against 0.5 * -2 = -1, margin 2 (must not count)
    # pair 2: chosen 0.5 * (-1 + 2) = 0.5, rejected 0.5 * (-5 + 6) = 0.5, margin 0 -> log 2
    torch.testing.assert_close(out["chosen"], torch.tensor([0.5, 1.0, 0.5]))
    torch.testing.assert_close(out["rejected"], torch.tensor([-0.5, -1.0, 0.5]))
    loss = token_mean(out["loss"], valid)  # the mean over the untied pairs
    assert float(loss) == pytest.approx((-_log_sigmoid(1.0) + math.log(2.0)) / 2, rel=1e-6)


def _frozen_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _moved(before: dict, model) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _one_iteration(objective: str, *overrides: str) -> tuple[dict, bool]:
    """Fit `objective` (a class of the configured method's module) for one iteration on the micro chain's sft and
    reward checkpoints; its first logged row and whether the policy moved. The reference and reward model must not."""
    import importlib

    from pipeline.data.datamodules import PromptData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt, load_reward_model
    from pipeline.paths import PREPARED
    from pipeline.training.trainer import fit

    from conftest import micro_config

    cfg = micro_config(*overrides, "align.steps=1")
    _, acfg = methods.load(cfg)
    module = importlib.import_module(f"pipeline.alignment.methods.{acfg.method}")
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, reference = load_gpt("sft")[0], load_gpt("sft")[0]
    rm = load_reward_model(policy.config, tok.sha256)
    before, ref_before, rm_before = _frozen_copy(policy), _frozen_copy(reference), _frozen_copy(rm)
    objective_module = getattr(module, objective)(policy.train(), reference, rm, tok, acfg, seed=0)
    _, curves, _ = fit(objective_module, PromptData(PREPARED, acfg.rollout_batch, 1, 0), cfg, TEST_STAGE,
                       validate=False, max_epochs=1, log_every=1)
    assert objective_module.reward_model is rm
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    assert all(torch.equal(rm_before[k], v) for k, v in rm.state_dict().items())
    assert not any(p.requires_grad for p in rm.parameters())
    return curves.train[0], _moved(before, policy)


def test_one_rloo_iteration_moves_the_policy_with_reward_model_scores(in_chain):
    row, moved = _one_iteration("RLOO", "align=rloo", "align.kl_coef=0.1")
    # sampled from the policy, which equals the reference then: the KL folded into the reward is 0
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"], abs=1e-5)
    assert row["policy/clipfrac_avg"] == 0.0 and row["train/reward"] == row["objective/scores"]
    assert row["objective/scores_std"] > 0, "the micro policy's samples of a prompt should score differently"
    assert moved


def test_one_reinforce_pp_iteration_moves_the_policy(in_chain):
    row, moved = _one_iteration("ReinforcePP", "align=reinforce_pp", "align.kl_coef=0.1")
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6) and row["train/kl"] == row["objective/kl"]
    assert row["objective/eos_rate"] <= 1.0 and row["objective/response_length"] >= 1
    assert moved  # two minibatches of whitened advantages: nothing can make them all zero here


def test_one_online_dpo_iteration_moves_the_policy_on_judged_pairs(in_chain):
    row, moved = _one_iteration("OnlineDPO", "align=online_dpo")
    assert row["pairs/tie_rate"] < 1.0, "the micro policy's two samples of some prompt should score differently"
    # one step that starts at policy == reference: every implicit reward is 0, the loss is log 2
    assert row["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert row["objective/scores_margin"] > 0 and row["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert moved


def test_online_dpo_with_the_checker_judges_by_exact_answers(in_chain):
    """judge: checker reads no reward model: the module has none, the scores are the checker's 0/1."""
    from pipeline.alignment.methods.online_dpo import OnlineDPO
    from pipeline.alignment.online import load_judge
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt

    from conftest import micro_config

    cfg = micro_config("align=online_dpo", "align.judge=checker")
    _, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy = load_gpt("sft")[0]
    assert load_judge(acfg.judge, policy, tok, "reward") is None
    module = OnlineDPO(policy, load_gpt("sft")[0], None, tok, acfg, seed=0)
    assert not hasattr(module, "reward_model") and len(module.frozen_modules()) == 1
    rows = [{"prompt": "x", "answer": "7"}] * 2
    b = {"responses": [tok.encode("7") + [tok.end_id], tok.encode("8") + [tok.end_id]]}
    assert module.score(rows, b).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp", "online_dpo"])
def test_align_stage_runs_each_online_method(name, micro_chain, tmp_path, monkeypatch):
    from pipeline.model.handoff import load_gpt, read_meta
    from stages import run_stage

    from conftest import compose_micro, micro_config

    work = shutil.copytree(micro_chain, tmp_path / "w")
    monkeypatch.chdir(work)
    sft = load_gpt("sft")[0].state_dict()
    metrics = run_stage("align", compose_micro(f"align={name}"))
    assert metrics["method"] == name and read_meta("aligned")["method"] == name
    method, acfg = methods.load(micro_config(f"align={name}"))
    assert metrics["policy_updates"] == method.policy_updates(acfg) > 0
    aligned = load_gpt("aligned")[0].state_dict()
    assert any(not torch.equal(sft[k], v) for k, v in aligned.items())
    assert "time/generation_s" not in metrics and "generation_s_per_iteration" in metrics
