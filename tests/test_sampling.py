"""The sampler: cache equals recompute, filters respect their sets, stops at the end token, seeded."""
from __future__ import annotations

import pytest
import torch

from pipeline.config.model import GPTConfig
from pipeline.inference.sampling import SamplingConfig, filter_logits, generate, penalize_repetition
from pipeline.model.gpt import GPT


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]


def test_greedy_with_cache_equals_full_recompute_on_ragged_batch():
    m = tiny_model()
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0)
    with_cache = generate(m, PROMPTS, cfg, stop_id=None, pad_id=0, use_cache=True)
    without = generate(m, PROMPTS, cfg, stop_id=None, pad_id=0, use_cache=False)
    assert with_cache == without
    # and batching doesn't change a row: each prompt alone gives the same tokens
    assert [generate(m, [p], cfg, stop_id=None, pad_id=0)[0] for p in PROMPTS] == with_cache


def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 5, -1).indices
    probs = torch.softmax(filter_logits(logits, top_k=5), -1)
    draws = torch.multinomial(probs, 2000, replacement=True)
    for row in range(4):
        assert set(draws[row].tolist()) <= set(allowed[row].tolist())


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    draws = torch.multinomial(torch.softmax(filter_logits(logits, top_p=0.7), -1), 1000, replacement=True)
    assert set(draws[0].tolist()) <= {0, 1}


def test_stops_after_the_stop_token_and_keeps_it():
    m = tiny_model()
    greedy = generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0), stop_id=None, pad_id=0)
    stop = greedy[0][2]  # make the 3rd greedy token of row 0 the stop token
    out = generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0), stop_id=stop, pad_id=0)
    assert out[0] == greedy[0][:greedy[0].index(stop) + 1]
    for row, full in zip(out, greedy):  # rows that never emit it run to max_new_tokens unchanged
        assert row == (full[:full.index(stop) + 1] if stop in full else full)
    for row in out:
        assert stop not in row[:-1]


def test_seeded_sampling_is_reproducible():
    m = tiny_model()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20)
    a = generate(m, PROMPTS, cfg, stop_id=None, pad_id=0, generator=torch.Generator().manual_seed(3))
    b = generate(m, PROMPTS, cfg, stop_id=None, pad_id=0, generator=torch.Generator().manual_seed(3))
    c = generate(m, PROMPTS, cfg, stop_id=None, pad_id=0, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_on_step_streams_every_rows_tokens_as_they_are_sampled():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    steps: list[list[int]] = []
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0), stop_id=None, pad_id=0,
                   on_step=steps.append)
    assert len(steps) == 6 and all(len(s) == 2 for s in steps)
    assert [[s[i] for s in steps] for i in range(2)] == out


def test_greedy_with_repetition_penalty_is_the_same_with_and_without_cache():
    m = tiny_model()
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, repetition_penalty=1.8)
    assert generate(m, PROMPTS, cfg, stop_id=None, pad_id=0) == generate(m, PROMPTS, cfg, stop_id=None, pad_id=0,
                                                                          use_cache=False)


def test_repetition_penalty_lowers_every_seen_token_and_only_those():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = penalize_repetition(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]  # positive halved, negative doubled, unseen untouched
    assert torch.equal(penalize_repetition(logits, seen, 1.0), logits)


def test_a_strong_repetition_penalty_stops_greedy_loops():
    m = tiny_model()
    plain = generate(m, PROMPTS, SamplingConfig(max_new_tokens=30, temperature=0.0), stop_id=None, pad_id=0)
    penalized = generate(m, PROMPTS, SamplingConfig(max_new_tokens=30, temperature=0.0, repetition_penalty=50.0),
                         stop_id=None, pad_id=0)
    repeats = lambda rows: sum(len(r) - len(set(r)) for r in rows)  # noqa: E731
    assert repeats(plain) > 0  # a random model loops...
    assert repeats(penalized) < repeats(plain)  # ...and the penalty breaks the loops


def test_any_of_several_stop_tokens_ends_a_row():
    m = tiny_model()
    greedy = generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0), stop_id=None, pad_id=0)
    stops = {greedy[0][3], greedy[1][1]}
    out = generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0), stop_id=stops, pad_id=0)
    for row, full in zip(out, greedy):
        end = next((i + 1 for i, t in enumerate(full) if t in stops), len(full))
        assert row == full[:end]
    assert len(out[0]) <= 4 and len(out[1]) <= 2  # each stop token ended its row


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(repetition_penalty=0.0)])
def test_bad_sampling_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=20, temperature=1.0),
                                 SamplingConfig(max_new_tokens=20, temperature=0.0),
                                 SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=8, repetition_penalty=1.3)])
def test_checking_for_the_end_every_few_steps_changes_no_token_and_no_later_draw(cfg):
    """What an accelerator does (one host sync every SYNC_EVERY steps) samples what a check every step samples,
    and leaves the generator where a check every step leaves it: the next call draws the same."""
    m = tiny_model()
    greedy = generate(m, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=0.0), stop_id=None, pad_id=0)
    stops = {greedy[0][2], greedy[1][4], greedy[2][1]}  # every row stops early, at different steps
    runs = {}
    for every in (1, 3, 7):
        g = torch.Generator().manual_seed(5)
        first = [generate(m, PROMPTS, cfg, stop_id=stops, pad_id=0, generator=g, sync_every=every) for _ in range(4)]
        runs[every] = first, torch.rand(3, generator=g).tolist()
    assert runs[1] == runs[3] == runs[7]
    assert any(len(row) < 20 for rows in runs[1][0] for row in rows)  # rows did stop before the budget


def test_the_global_generator_is_rewound_too():
    m = tiny_model()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0)
    stops = set(range(0, 61, 3))  # a third of the vocabulary ends a row: every row stops within a few steps
    draws = []
    for every in (1, 6):
        torch.manual_seed(11)
        out = generate(m, PROMPTS, cfg, stop_id=stops, pad_id=0, sync_every=every)
        draws.append((out, torch.rand(2).tolist()))
    assert draws[0] == draws[1]
    assert all(len(row) < 20 for row in draws[0][0])
