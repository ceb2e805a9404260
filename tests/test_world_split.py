"""How the RLHF stages split their work over ranks, in one process: the pieces the 2-process runs of
tests/test_scale_out.py rest on, and the refusals that come before any work."""
from __future__ import annotations

import pytest
import torch

from pipeline.alignment import methods
from pipeline.alignment.rollout import masked_mean, minibatches
from pipeline.config.schema import ConfigError
from pipeline.data.datamodules import RankRows, Weighted
from pipeline.training.parallel import global_mean, shares, token_mean

from conftest import micro_config


def test_validation_rows_are_split_without_loss_and_padding_weighs_nothing():
    n, world = 11, 3
    parts = [list(RankRows(n, rank, world)) for rank in range(world)]
    assert {len(p) for p in parts} == {4}  # every rank runs as many batches
    real = sorted(i for p in parts for i in p if i >= 0)
    assert real == list(range(n))  # each held-out row scored once, by one rank
    rows = Weighted([f"row{i}" for i in range(n)])
    assert rows[5] == ("row5", 1.0) and rows[-1] == ("row0", 0.0)
    assert list(RankRows(n)) == list(range(n))  # one process: the rows in order, no padding


def test_one_process_means_are_the_plain_masked_means():
    x, mask = torch.randn(4, 6), torch.rand(4, 6) > 0.3
    assert torch.equal(token_mean(x, mask), masked_mean(x, mask))
    assert torch.equal(global_mean(x, mask), masked_mean(x, mask))
    assert shares(5) == [0, 1, 2, 3, 4]


def test_minibatches_cover_the_rollout_once_per_epoch():
    batches = list(minibatches(12, 4, 2, seed=0))
    assert len(batches) == 6
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(12))


@pytest.mark.parametrize("override, world, message", [
    (("align=grpo", "align.rollout_batch=5"), 2, "align.rollout_batch (5) does not split over 2 processes"),
    (("align=ppo", "align.minibatch_size=3", "align.rollout_batch=8"), 2, "align.minibatch_size (3)"),
    (("align=grpo", "strategy=fsdp2"), 2, "use strategy=ddp"),
    # DPO shards, but its evaluations during the run need the whole policy on rank 0
    (("align=dpo", "strategy=fsdp2", "align.eval_every=5"), 2,
     "align.eval_every (5) evaluates the policy on rank 0 alone, which sharded weights (strategy=fsdp2) cannot do"),
])
def test_online_methods_refuse_a_world_their_batches_or_strategy_cannot_take(override, world, message):
    cfg = micro_config(*override)
    _, acfg = methods.load(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        methods.check_world(acfg, world, cfg.strategy.name, getattr(cfg.strategy, "stage", None))
    methods.check_world(acfg, 1, cfg.strategy.name)  # one process takes any batch


def test_on_policy_pairs_are_sampled_on_the_trainers_device_in_its_precision(in_chain, monkeypatch):
    """reward and DPO sample their on-policy pairs in the datamodule's setup: the policy goes to the rank's device
    (CUDA simulated: the move is recorded, the work stays on the CPU) in the trainer's precision (bf16-true)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import HalfPrecision

    from pipeline.config.training import OnPolicyConfig
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.gpt import GPT
    from pipeline.model.handoff import load_gpt
    from pipeline.training.reward import sample_on_policy

    tok = load_tokenizer(micro_config().tokenizer.special_tokens)
    policy, _ = load_gpt("sft", tok.sha256)
    policy.train()
    moves, seen = [], set()
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            moves.append(args[0])
            return self
        return real_to(self, *args, **kwargs)

    real_hidden = GPT._hidden

    def hidden(self, idx, **kwargs):
        seen.add(self.wte.weight.dtype)
        return real_hidden(self, idx, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(GPT, "_hidden", hidden)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 1)),
                              precision_plugin=HalfPrecision("bf16-true"))
    pairs = sample_on_policy(policy, tok, OnPolicyConfig(prompts=4, samples=2, max_new_tokens=4), 0, trainer)
    assert moves == [torch.device("cuda", 1)]
    assert seen == {torch.bfloat16} and policy.training  # sampled in bf16, the training mode given back
    assert all(p["corruption"] == "on_policy" for p in pairs)
