"""The GPT: causal attention, positional encodings, the KV cache, padding, and that it learns."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config.model import GPTConfig
from pipeline.model.gpt import GPT, sinusoidal_table

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(params=["learned", "sinusoidal"])
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, pos_encoding=request.param)).eval()


def test_future_tokens_do_not_change_past_logits(model):
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


def test_sinusoidal_positions_are_not_parameters():
    m = GPT(GPTConfig(**TINY, pos_encoding="sinusoidal"))
    assert not any("pe" == n.split(".")[-1] for n, _ in m.named_parameters())
    x = torch.randint(0, 97, (1, 8))
    assert not torch.allclose(m(x)[0, 3], m(x.roll(1, 1))[0, 4])  # same token, other position, other logits


def test_lm_head_is_tied_to_the_embedding(model):
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_kv_cache_gives_the_same_logits_as_full_recompute(model):
    x = torch.randint(0, 97, (3, 20))
    full = model(x)
    cache = model.new_kv_cache(3)
    parts = [model(x[:, :7], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_left_padding_changes_nothing(model):
    x = torch.randint(0, 97, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, :5] = False
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 5:], model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, field", [(dict(n_embd=30, n_head=4), "n_head"), (dict(n_layer=0), "n_layer"),
                                        (dict(pos_encoding="rotary"), "pos_encoding"), (dict(dropout=1.5), "dropout")])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, **bad})


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_memorises_a_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY))
    x = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(97) - 0.5
    assert losses[-1] < 0.5 * losses[0]
