"""The shared RL toolkit (GAE, KL estimators, sequence packing) and one real PPO update."""
from __future__ import annotations

import pytest
import torch

from pipeline.alignment.rollout import gae, kl_penalty, masked_whiten
from pipeline.config.model import GPTConfig
from pipeline.inference.sequences import build_sequences
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead
from pipeline.model.logprobs import response_logprobs
from pipeline.registry import StageSpec
from pipeline.training.reward import pairwise_stats


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True, False]])  # the 4th position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.5
    d1 = 0.0 + gamma * 0.5 - 0.25
    d0 = 0.0 + gamma * 0.25 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.25, a2 + 0.5, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5, 0.1])), torch.log(torch.tensor([0.25, 0.4]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()  # k3 is non-negative per sample, unlike k1
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(logp, ref, "k2")


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0 and abs(float(w[0, :3].mean())) < 1e-6


def test_packed_sequences_give_the_same_logprobs_as_single_rows():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts, responses = [[1, 2, 3], [4, 5, 6, 7, 8]], [[9, 10], [11, 12, 13, 14]]
    seq, attn, mask, P = build_sequences(prompts, responses, pad_id=0)
    batched, _ = response_logprobs(m, seq, attn, P)
    for i in range(2):
        s, a, _, p = build_sequences([prompts[i]], [responses[i]], pad_id=0)
        single, _ = response_logprobs(m, s, a, p)
        torch.testing.assert_close(batched[i, :len(responses[i])], single[0], atol=1e-5, rtol=1e-4)


def test_bradley_terry_loss_and_accuracy():
    s = pairwise_stats(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0]))
    assert float(s["accuracy"]) == 0.5
    logsigmoid = torch.nn.functional.logsigmoid
    expected = -(logsigmoid(torch.tensor(2.0)) + logsigmoid(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(s["loss"], expected)


def test_one_ppo_iteration_moves_the_policy_and_nothing_frozen(in_chain):
    """A real rollout + update on the micro chain's checkpoints, through the shared `fit`."""
    from pipeline.alignment import methods
    from pipeline.alignment.methods.ppo import PPO
    from pipeline.data.datamodules import PromptData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt, load_reward_model
    from pipeline.paths import PREPARED
    from pipeline.training.trainer import fit

    from conftest import micro_config

    cfg = micro_config("align.steps=1", "align.critic_warmup=0", "align.adaptive_kl.target=0.5", "align.optim.lr=1e-3")
    _, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, _ = load_gpt("sft")
    reference, _ = load_gpt("sft")
    rm = load_reward_model(policy.config)
    critic = load_reward_model(policy.config).drop_likelihood_term()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    rm_before = {k: v.clone() for k, v in rm.state_dict().items()}
    module = PPO(policy.train(), reference, critic.train(), rm, tok, acfg, seed=0)
    _, curves, _ = fit(module, PromptData(PREPARED, acfg.rollout_batch, 1, 0), cfg, StageSpec("align_test", "a test"),
                       validate=False, max_epochs=1, log_every=1)
    # the adaptive controller shaped this rollout with the initial beta, then moved it
    assert curves.train[0]["objective/kl_coef"] == pytest.approx(acfg.kl_coef)
    assert module.beta != acfg.kl_coef
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    assert all(torch.equal(rm_before[k], v) for k, v in rm.state_dict().items())


def test_reward_model_likelihood_term_needs_the_response_mask_and_uses_a_frozen_copy():
    torch.manual_seed(0)
    backbone = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16))
    rm = ScalarHead(backbone, likelihood_term=True)
    seq, attn, mask, P = build_sequences([[1, 2, 3]], [[4, 5]], pad_id=0)
    from pipeline.inference.sequences import response_positions
    with pytest.raises(ValueError, match="response_mask"):
        rm(seq, torch.tensor([seq.size(1) - 1]), attn)
    score = rm(seq, torch.tensor([seq.size(1) - 1]), attn, response_mask=response_positions(mask, P))
    score.sum().backward()
    assert all(p.grad is None for p in rm.frozen_lm.parameters())
    assert rm.lm_scale.grad is not None and backbone.wte.weight.grad is not None
    critic = rm.drop_likelihood_term()
    assert not hasattr(critic, "frozen_lm") and critic(seq, torch.tensor([seq.size(1) - 1]), attn).shape == (1,)


def test_on_policy_pairs_hold_only_wrong_samples(in_chain):
    from pipeline.data.splits import load_split
    from pipeline.data.tasks import check
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.paths import PREPARED
    from pipeline.training.reward import on_policy_pairs

    from conftest import micro_config

    tok = load_tokenizer(micro_config().tokenizer.special_tokens)
    rows = load_split(PREPARED, "rl_prompts")[:16]
    pairs = on_policy_pairs(load_gpt("sft")[0], tok, rows, samples=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert pairs, "an untrained micro policy answers some prompts wrongly"
    for p in pairs:
        assert p["corruption"] == "on_policy" and p["chosen"] in {r["answer"] for r in rows}
        assert not (p["rejected_has_end"] and check(p["chosen"], p["rejected"]))
    assert len({(p["key"], p["rejected"], p["rejected_has_end"]) for p in pairs}) == len(pairs)


def test_logprobs_follow_the_sampling_temperature():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    seq, attn, mask, P = build_sequences([[1, 2, 3]], [[4, 5, 6]], pad_id=0)
    lp_hot, _ = response_logprobs(m, seq, attn, P, temperature=0.5)
    logits = m(seq, attention_mask=attn)[:, P - 1:-1] / 0.5
    expected = torch.log_softmax(logits, -1).gather(-1, seq[:, P:, None]).squeeze(-1)
    torch.testing.assert_close(lp_hot, expected)
    assert not torch.allclose(lp_hot, response_logprobs(m, seq, attn, P)[0])


def test_group_centre_removes_each_prompts_mean():
    from pipeline.alignment.rollout import group_centre
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0, -2.0, -2.0])
    torch.testing.assert_close(group_centre(scores, 2), torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]))
