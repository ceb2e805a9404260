"""Bring your own model: tiny random Llama (grouped-query), Qwen2 (Q/K/V biases, tied embeddings), Mistral
and GPT-2 checkpoints built with transformers and saved to disk (no download) import into the pipeline's
GPT with transformers' own logits and greedy tokens, export back to their own architecture, and round-trip
to equal weights; what the pipeline cannot compute is refused before any work, naming the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config.model import GPTConfig, ModelConfig
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.interop.hf import (
    check_pretrained,
    hf_config,
    hf_state_dict,
    load_pretrained,
    pretrained_shape,
    read_weights,
)
from pipeline.model.gpt import GPT

transformers = pytest.importorskip("transformers")
VOCAB = 96


def family_configs() -> dict[str, object]:
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128)
    return {
        "llama": transformers.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False,
                                          rope_theta=50000.0),
        "llama3_scaled": transformers.LlamaConfig(**small, num_key_value_heads=1, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "qwen2": transformers.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**small, num_key_value_heads=2, sliding_window=None),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4),
    }


def save_random(config, path: Path, dtype: torch.dtype = torch.float32, **save) -> torch.nn.Module:
    """A random transformers model of `config`, saved to `path` as a user's checkpoint would be."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake cannot hide behind ones and zeros
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.to(dtype).save_pretrained(str(path), **save)
    return hf.float()


def imported(path: Path, block_size: int = 128) -> GPT:
    shape = pretrained_shape(ModelConfig(init_from=f"hf:{path}", block_size=block_size), VOCAB)
    return load_pretrained(GPT(shape), path).eval()


@pytest.fixture(scope="module", params=list(family_configs()))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_random(family_configs()[request.param], path)
    return request.param, hf, imported(path), path


def left_padded(lengths: list[int], width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids * mask, mask


def test_imported_logits_match_transformers(family):
    name, hf, model, _ = family
    ids = torch.randint(0, VOCAB, (3, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4, name
        ids, mask = left_padded([40, 23, 9], 40)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask.bool())
    real = mask.bool()
    assert (theirs[real] - ours[real]).abs().max().item() < 1e-4, name


def test_greedy_tokens_through_the_kv_cache_match_transformers_generate(family):
    name, hf, model, _ = family
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 12)]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=32, temperature=0.0), stop_id=None, pad_id=0)
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == mine, name


def test_export_loads_as_its_own_architecture_and_round_trips(family, tmp_path):
    name, hf, model, _ = family
    arch = type(hf).__name__
    first = hf_state_dict(model, arch)
    out = tmp_path / "export"
    out.mkdir()
    from safetensors.torch import save_file
    save_file(first, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(model.config, arch, {"pad": 0, "bos": 1, "eos": 2})))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(back).__name__ == arch
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-4, name
    again = hf_state_dict(imported(out), arch)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), name


def test_sharded_bf16_checkpoint_loads(tmp_path):
    hf = save_random(family_configs()["llama"], tmp_path, dtype=torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert {t.dtype for t in read_weights(tmp_path).values()} == {torch.bfloat16}
    model = imported(tmp_path)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True,
                                                                dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        assert (hf_bf16(ids).logits - model(ids)).abs().max().item() < 1e-4
    assert hf is not None


def test_imported_shape_needs_nothing_restated(tmp_path):
    save_random(family_configs()["qwen2"], tmp_path)
    shape = pretrained_shape(ModelConfig(init_from=f"hf:{tmp_path}", n_layer=7, n_embd=512, n_head=8), VOCAB + 5)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.kv_heads) == (2, 32, 4, 2)
    assert (shape.pos_encoding, shape.norm, shape.mlp, shape.tie_embeddings) == ("rope", "rmsnorm", "swiglu", True)
    assert shape.has_bias("qkv") and not shape.has_bias("o") and not shape.has_bias("mlp")
    assert shape.vocab_size == 128 and shape.architecture == "Qwen2ForCausalLM"  # 101 tokens, padded to 64


def edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MixtralForCausalLM"], model_type="mixtral"), "architectures=.*MixtralForCausalLM"),
    (dict(num_local_experts=8), "num_local_experts=8: a mixture of experts"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(max_position_embeddings=64), r"model.block_size \(128\) exceeds .*max_position_embeddings \(64\)"),
])
def test_unsupported_architectures_and_fields_are_refused_naming_them(tmp_path, changes, message):
    save_random(family_configs()["llama"], tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as err:
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}", block_size=128), VOCAB)
    assert str(tmp_path / "config.json") in str(err.value)


def test_mistral_sliding_window_narrower_than_the_context_is_refused(tmp_path):
    save_random(family_configs()["mistral"], tmp_path)
    edit_config(tmp_path, sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window=64.*set model.block_size=64 or less"):
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}", block_size=128), VOCAB)
    assert check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}", block_size=64), VOCAB).block_size == 64


def test_a_shard_missing_from_the_index_is_refused_naming_it(tmp_path):
    save_random(family_configs()["llama"], tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists the shard {shard}, which is not in"):
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}"), VOCAB)


def test_weights_the_model_has_no_place_for_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    save_random(family_configs()["llama"], tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)   # Qwen3's QK-norm
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="q_norm.weight.*no place for"):
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}"), VOCAB)


def test_switch_combinations_keep_the_cache_and_padding_exact():
    """Every combination of the new switches: cached decoding equals a full forward, and left padding does not
    change a row's logits."""
    torch.manual_seed(0)
    for kw in (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, tie_embeddings=False),
               dict(pos_encoding="sinusoidal", n_kv_head=2, qkv_bias=True, o_bias=False, mlp_bias=False),
               dict(pos_encoding="learned", mlp="swiglu", intermediate_size=48, head_dim=16)):
        model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)).eval()
        ids = torch.randint(0, 64, (1, 20))
        with torch.no_grad():
            full = model(ids)
            cache = model.new_kv_cache(1)
            steps = [model(ids[:, :12], kv_cache=cache)[:, -1]]
            steps += [model(ids[:, t:t + 1], kv_cache=cache)[:, -1] for t in range(12, 20)]
            assert (torch.stack(steps[1:], 1) - full[:, 12:20]).abs().max() < 1e-5, kw
            padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
            mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], 1)
            assert (model(padded, attention_mask=mask)[:, 5:] - full).abs().max() < 1e-5, kw
        flops = model.flops_per_token(32)
        c = model.config
        counted = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe", "lm_head")))
        expected = 6 * (counted + c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_head * c.dim_per_head * 32
        assert flops == expected, kw


@pytest.mark.parametrize("damage, message", [
    ("architecture", "architectures=.*MixtralForCausalLM"),
    ("tokenizer", "tokenizer.json not found"),
    ("weights", "has no model.safetensors"),
])
def test_the_tokenizer_stage_refuses_a_checkpoint_it_cannot_import_before_writing(micro_chain, tmp_path, monkeypatch,
                                                                                   damage, message):
    """The first stage that reads model.init_from refuses, naming the file, and writes nothing."""
    import os

    from stages import run_stage

    from byom import tiny_llama_dir
    from conftest import compose_micro
    source = tiny_llama_dir(tmp_path / "llama", ["the quick brown fox jumps over the lazy dog"] * 50)
    if damage == "architecture":
        edit_config(source, architectures=["MixtralForCausalLM"], model_type="mixtral")
    else:
        (source / ("tokenizer.json" if damage == "tokenizer" else "model.safetensors")).unlink()
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(micro_chain / "data" / "prepared", work / "data" / "prepared")
    monkeypatch.chdir(work)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        run_stage("tokenizer", compose_micro(f"model.init_from=hf:{source}", "pretrain.max_steps=0"))
    assert str(source) in str(err.value)
    assert not (work / "artifacts").exists() and not (work / "data" / "tokens").exists()
