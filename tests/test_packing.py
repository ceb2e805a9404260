"""Packed rows compute what their examples compute alone: the block-diagonal mask, positions that restart per
document, the loss and its gradients, and a packing that is deterministic and fills its rows."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.model import GPTConfig
from pipeline.data.packing import IGNORE_INDEX, collate, pack, padding_fraction
from pipeline.model.gpt import GPT

WIDTH = 64
SHAPES = {"learned": dict(pos_encoding="learned"),
          "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False)}


def model(kind: str, dtype: torch.dtype = torch.float64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, **SHAPES[kind])).to(dtype)


def examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Chat-like examples: a document token, a prompt (no loss), a reply (loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(5, 97) for _ in range(rng.randrange(2, 10))]
        reply = [rng.randrange(5, 97) for _ in range(rng.randrange(1, 12))]
        out.append((prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


@pytest.mark.parametrize("kind", list(SHAPES))
def test_a_packed_row_gives_each_document_its_own_logits(kind):
    m = model(kind)
    docs = examples(4)
    batch = collate([docs], WIDTH, pad_id=0)
    packed = m(batch["input_ids"], document_ids=batch["document_ids"], attention_mask=batch["attention_mask"])
    at = 0
    for ids, _ in docs:
        alone = m(torch.tensor([ids]))
        assert torch.allclose(packed[0, at:at + len(ids)], alone[0], atol=1e-10)
        at += len(ids)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_changing_one_document_leaves_the_others_logits_unchanged(kind):
    m = model(kind)
    docs = examples(3)
    batch = collate([docs], WIDTH, pad_id=0)
    before = m(batch["input_ids"], document_ids=batch["document_ids"])
    changed = batch["input_ids"].clone()
    n = len(docs[0][0])
    changed[0, 1:n] = (changed[0, 1:n] + 7) % 97
    after = m(changed, document_ids=batch["document_ids"])
    assert not torch.equal(before[0, :n], after[0, :n])
    assert torch.equal(before[0, n:], after[0, n:])  # not just close: no path from document 0 to the rest


def test_the_mask_is_block_diagonal_and_causal():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    captured = {}
    m = model("learned")
    block = m.h[0].attn
    original = block.forward

    def spy(x, attn_mask, *args, **kwargs):
        captured["mask"] = attn_mask
        return original(x, attn_mask, *args, **kwargs)

    block.forward = spy
    m(torch.randint(5, 97, (1, 8)), document_ids=docs)
    mask = captured["mask"][0, 0]
    for q in range(8):
        for k in range(8):
            assert bool(mask[q, k]) == (docs[0, q] == docs[0, k] and k <= q), (q, k)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_the_packed_loss_and_gradients_equal_the_examples_one_by_one(kind, dtype, tolerance):
    docs = examples(5, seed=1)
    rows = pack([len(x) for x, _ in docs], WIDTH)
    assert len(rows) < len(docs)  # several examples share a row
    m = model(kind, dtype)
    batch = collate([[docs[i] for i in row] for row in rows], WIDTH, pad_id=0)
    loss = token_losses(m(batch["input_ids"], document_ids=batch["document_ids"],
                          attention_mask=batch["attention_mask"]), batch["labels"])
    packed = torch.autograd.grad(loss, list(m.parameters()))
    one_by_one = sum(token_losses(m(torch.tensor([x])), torch.tensor([y])) for x, y in docs)
    alone = torch.autograd.grad(one_by_one, list(m.parameters()))
    assert torch.allclose(loss, one_by_one, atol=tolerance, rtol=0)
    for a, b in zip(packed, alone):
        assert torch.allclose(a, b, atol=tolerance, rtol=0)


def test_packing_is_deterministic_and_fills_its_rows():
    rng = random.Random(3)
    lengths = [rng.randrange(3, 40) for _ in range(300)]
    rows = pack(lengths, 128)
    assert rows == pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert padding_fraction(lengths, rows, 128) < 0.02
    one_each = [[i] for i in range(300)]
    assert padding_fraction(lengths, one_each, 40) > 0.4  # one per row, padded to the longest: mostly padding
    with pytest.raises(ValueError, match="example 1 has 200 tokens"):
        pack([3, 200], 128)


def test_a_packed_sft_batch_holds_the_same_conversations_and_gives_the_same_loss(tmp_path, monkeypatch):
    from pipeline import paths
    from pipeline.data.datamodules import ChatData
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.training.lm import lm_loss

    from conftest import micro_config, seeded_workspace

    seeded_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = micro_config()
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    model = load_gpt("pretrain", tok.sha256)[0].double()
    block = model.config.block_size
    plain = ChatData(paths.PREPARED, tok, block, 16, cfg.seed)
    packed = ChatData(paths.PREPARED, tok, block, 16, cfg.seed, packing=True)
    plain.setup(), packed.setup()
    padded_positions = packed_positions = 0
    for start in range(0, len(plain.train_set) - 16, 16):
        items = plain.train_set[start:start + 16]
        a, b = plain.collate(items), packed.collate(items)
        assert int((a["labels"] != IGNORE_INDEX).sum()) == int((b["labels"] != IGNORE_INDEX).sum())
        with torch.no_grad():
            ours = lm_loss(model(b["input_ids"], document_ids=b["document_ids"]), b["labels"])
            theirs = lm_loss(model(a["input_ids"]), a["labels"])
        assert torch.allclose(ours, theirs, atol=1e-9), (ours, theirs)
        padded_positions += a["input_ids"].numel()
        packed_positions += b["input_ids"].numel()
        if padded_positions > 2000:
            break
    assert packed_positions < padded_positions
    batch = next(iter(packed.train_dataloader()))  # the loader packs its shuffled batches of 16 conversations
    assert int((batch["document_ids"].max(1).values + 1).sum()) == 16


def preference_items(n: int, seed: int = 2) -> list[tuple[list[int], int]]:
    """n pairs as PreferenceData lays them out: n chosen sequences, then n rejected ones, each (ids, prompt length)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(5, 97) for _ in range(rng.randrange(2, 8))]
        pairs.append([(prompt + [rng.randrange(5, 97) for _ in range(rng.randrange(1, 9))], len(prompt))
                      for _ in range(2)])
    return [c for c, _ in pairs] + [r for _, r in pairs]


def padded_preference(items, pad_id: int = 0) -> dict:
    width = max(len(s) for s, _ in items)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s, _ in items])
    pos = torch.arange(width)[None]
    lengths = torch.tensor([len(s) for s, _ in items])[:, None]
    starts = torch.tensor([n for _, n in items])[:, None]
    return {"input_ids": ids, "last": lengths[:, 0] - 1, "response_mask": ((pos >= starts) & (pos < lengths)).float()}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_packed_dpo_logprobs_and_lengths_equal_the_padded_ones(kind):
    from pipeline.alignment.preference import response_tokens
    from pipeline.data.packing import collate_sequences
    from pipeline.model.logprobs import packed_sequence_logprobs, sequence_logprobs

    items = preference_items(6)
    packed, padded = collate_sequences(items, 64, 0), padded_preference(items)
    assert packed["input_ids"].size(0) < len(items)
    m = model(kind)
    ours = packed_sequence_logprobs(m, packed["input_ids"], packed["document_ids"], packed["response_mask"],
                                    packed["sequence_ids"], len(items))
    theirs = sequence_logprobs(m, padded["input_ids"], padded["response_mask"])
    assert torch.allclose(ours, theirs, atol=1e-10)
    assert torch.equal(response_tokens(packed), response_tokens(padded))


def test_packed_reward_scores_equal_the_padded_ones_with_the_likelihood_term():
    from pipeline.data.packing import collate_sequences
    from pipeline.model.heads import ScalarHead

    items = preference_items(5, seed=4)
    packed, padded = collate_sequences(items, 64, 0), padded_preference(items)
    torch.manual_seed(1)
    rm = ScalarHead(model("llama"), likelihood_term=True).double()
    with torch.no_grad():
        rm.lm_scale.fill_(0.3)
    ours = rm(packed["input_ids"], packed["last"], response_mask=packed["response_mask"],
              document_ids=packed["document_ids"], sequence_ids=packed["sequence_ids"])
    theirs = rm(padded["input_ids"], padded["last"], response_mask=padded["response_mask"])
    assert ours.shape == (len(items),) and torch.allclose(ours, theirs, atol=1e-10)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import seeded_workspace
    return seeded_workspace(tmp_path_factory.mktemp("packing"), "trainer.progress_bar=false")


def test_the_sft_and_reward_stages_pack_by_default_and_record_the_padding_they_compute(workspace, monkeypatch):
    from stages import run_stage

    from conftest import compose_micro, micro_config

    cfg = micro_config()
    assert cfg.sft.packing and cfg.reward.packing  # the default chain packs
    monkeypatch.chdir(workspace)
    metrics = {}
    for packing in (True, False):
        for stage in ("sft", "reward"):
            metrics[stage, packing] = run_stage(stage, compose_micro(  # batches big enough to fill some rows
                "trainer.progress_bar=false", "sft.batch_size=32", "reward.batch_size=16",
                f"{stage}.packing={str(packing).lower()}"))
            logged = (workspace / "dvclive" / stage / "plots" / "metrics" / "train" / "padding.tsv").read_text()
            assert len(logged.splitlines()) > 2  # a header and a row per logging step
    for stage in ("sft", "reward"):
        packed, padded = metrics[stage, True], metrics[stage, False]
        assert packed["padding"] < padded["padding"] / 2, (stage, packed["padding"], padded["padding"])
        assert all(torch.isfinite(torch.tensor(m["val_loss"])) for m in (packed, padded))
    # the reward stage counts real tokens, not positions: the same pairs give the same count either way
    assert metrics["reward", True]["tokens"] == metrics["reward", False]["tokens"]
