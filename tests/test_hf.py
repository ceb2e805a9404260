"""Exchange with transformers: an exported checkpoint loads and computes exactly what the pipeline
computes (logits, greedy tokens, tokenizer, chat template); an imported GPT-2 gives its own logits
back; bad inputs are refused before any work, naming the field to change."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline.config.model import GPTConfig, ModelConfig
from pipeline.config.schema import ConfigError
from pipeline.data.tokenizer import import_tokenizer, load_tokenizer
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.interop.hf import (
    check_imported_tokenizer,
    check_pretrained,
    export_model,
    load_pretrained,
    pretrained_shape,
)
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt
from pipeline.paths import TOKENIZER_FILE

from conftest import compose_micro

transformers = pytest.importorskip("transformers")
SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def exported(micro_chain) -> Path:
    """The micro chain's `export` stage output: the aligned model as a GPT-2 directory."""
    return micro_chain / "artifacts" / "export"


@pytest.fixture
def pipeline_side(in_chain):
    tok = load_tokenizer(compose_micro().tokenizer.special_tokens)
    model, _ = load_gpt("aligned", tok.sha256)
    return model, tok


def test_export_stage_writes_a_transformers_directory(in_chain, exported):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "gpt_pipeline.json"):
        assert (exported / name).is_file(), name
    metrics = json.loads((in_chain / "metrics" / "export.json").read_text())
    assert metrics["checkpoint"] == "aligned" and metrics["model_mb"] > 0
    assert json.loads((exported / "gpt_pipeline.json").read_text())["checkpoint"] == "aligned"


def test_logits_and_greedy_generation_match_the_pipeline(pipeline_side, exported):
    model, tok = pipeline_side
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    assert hf.config.vocab_size == model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (4, model.config.block_size), generator=g)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    prompts = [tok.prompt("What is 12 + 30?"), tok.prompt("Reverse the letters of cat."),
               torch.randint(5, tok.vocab_size, (20,), generator=g).tolist()]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=32, temperature=0.0), stop_id=None, pad_id=tok.pad_id)
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == mine and len(mine) == 32


def test_tokenizer_round_trips_and_renders_the_chat_template(pipeline_side, exported):
    _, tok = pipeline_side
    hf = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.end_id)
    for text in ("Mira the blue fox lives in 12 caves.", "<|bos|><|user|>hi there<|assistant|>42<|end|>",
                 "  spaces,\nnewlines and ünïcödé 3456"):
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text
    assert hf.encode("What is 7 + 8?", add_special_tokens=False) == tok.encode("What is 7 + 8?")
    assert hf.encode("<|user|>", add_special_tokens=False) == [tok.user_id]
    q = "What is 12 + 30?"
    prompt = hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    assert list(prompt) == tok.prompt(q)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": "42"},
                {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2"}]
    rendered = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(rendered) == tok.chat(messages)[0]


def test_a_system_message_is_folded_into_the_first_user_turn_in_both_templates(pipeline_side, exported):
    _, tok = pipeline_side
    hf = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    system = {"role": "system", "content": "Answer with a number."}
    turns = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
             {"role": "user", "content": "And 1 + 1?"}]
    for messages in ([system, turns[0]], [system, *turns]):
        ours = tok.render(messages, add_generation_prompt=True)
        theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(theirs) == ours
        assert ours == tok.render([{"role": "user", "content": "Answer with a number.\n\nWhat is 12 + 30?"},
                                   *messages[2:]], add_generation_prompt=True)
    assert tok.chat([system, *turns, {"role": "assistant", "content": "2"}])[1].count(tok.end_id) == 2  # labels
    for bad in ([system], [system, turns[1]]):
        with pytest.raises(ValueError, match="system message must be followed by a user message"):
            tok.render(bad)
        with pytest.raises(Exception, match="system message must be followed by a user message"):
            hf.apply_chat_template(bad, tokenize=False)


def test_transformers_pipeline_replies_greedily_within_the_context_by_default(tmp_path):
    """`pipeline("text-generation")` given only the messages (a system message first): the reply is the pipeline's
    greedy one (as `evaluate` decodes), whatever the seed, stopping at <|end|> or the context, never past it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=16)).eval()
    tokenizer_file = tmp_path / "tokenizer.json"
    byte_level_tokenizer(SPECIALS).save(str(tokenizer_file))
    tok = load_tokenizer(SPECIALS, tokenizer_file)
    export_model(model, tok, tokenizer_file, tmp_path / "hf")
    config = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert config.do_sample is False and config.max_length == 48
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (tok.bos_id, tok.end_id, tok.pad_id)
    messages = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "the fox?"}]
    prompt = tok.render(messages)
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=48, temperature=0.0), stop_id=tok.end_id,
                    pad_id=tok.pad_id)[0]
    chat = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    # before 5.16 the pipeline's own do_sample=True beats the model's do_sample=false (docs/huggingface.md): there
    # (CI's lowest-direct run, transformers 4.56) the documented workaround is what is checked, and the reply is cut
    # from the decoded text by characters, so this tokenizer (no decoder: tokens joined by spaces) leaves one space
    older = Version(transformers.__version__) < Version("5.16")
    replies = []
    for seed in (0, 1):
        transformers.set_seed(seed)
        reply = chat(messages, **({"do_sample": False} if older else {}))[0]["generated_text"][-1]["content"]
        replies.append(reply.removeprefix(" ") if older else reply)
    assert replies == [tok.decode(tok.strip_response(ours))] * 2
    assert len(prompt) + len(ours) == 48  # the random model never says <|end|>: the reply fills the context


def test_sinusoidal_bias_free_model_exports_exactly(tmp_path):
    """Sinusoidal positions become GPT-2's position table; a bias-free model gets zero biases."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=576, block_size=64, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding="sinusoidal", bias=False)).eval()
    tokenizer_file = tmp_path / "tokenizer.json"
    byte_level_tokenizer(SPECIALS).save(str(tokenizer_file))
    export_model(model, load_tokenizer(SPECIALS, tokenizer_file), tokenizer_file, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    ids = torch.randint(0, 576, (2, 64))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_export_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = GPT(GPTConfig(vocab_size=576, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="not an earlier export"):
        export_model(model, None, tmp_path / "tokenizer.json", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_export_writes_any_stage(in_chain, tmp_path):
    from pipeline.cli import main
    assert main(["export", "--stage", "sft", "--out", str(tmp_path / "sft")]) == 0
    assert json.loads((tmp_path / "sft" / "gpt_pipeline.json").read_text())["checkpoint"] == "sft"
    assert main(["export", "--stage", "sft", "--out", str(tmp_path / "sft")]) == 0   # an earlier export: replaced


# -------------------------------------------------------------------------------------------- import

def byte_level_tokenizer(special_tokens: list[str], vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return tok


def random_gpt2(path: Path, **overrides) -> transformers.GPT2LMHeadModel:
    """A randomly initialised transformers GPT-2 (OpenAI's tanh GELU) saved with a tokenizer lacking
    the pipeline's special tokens."""
    tok = byte_level_tokenizer(["<|endoftext|>"])
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=2,
                                     n_head=2, **overrides)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(path))
    tok.save(str(path / "tokenizer.json"))
    return hf


def test_imported_gpt2_gives_the_same_logits(tmp_path):
    hf = random_gpt2(tmp_path)
    vocab = hf.config.vocab_size
    model = GPT(pretrained_shape(ModelConfig(init_from=f"hf:{tmp_path}"), vocab))
    assert model.config.activation == "gelu_tanh" and model.config.architecture == "GPT2LMHeadModel"
    load_pretrained(model.eval(), tmp_path)
    ids = torch.randint(0, vocab, (3, 128))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[..., :vocab]).abs().max().item() < 1e-4


def test_imported_tokenizer_gains_the_special_tokens_after_its_vocabulary(tmp_path):
    hf = random_gpt2(tmp_path)
    tok = import_tokenizer(tmp_path, SPECIALS)
    n = hf.config.vocab_size
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(n, n + 5))
    assert tok.encode("the fox").ids == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("the fox").ids
    check_imported_tokenizer(tmp_path, tok, SPECIALS)
    with pytest.raises(ValueError, match="dvc repro tokenizer"):
        check_imported_tokenizer(tmp_path, byte_level_tokenizer(SPECIALS), SPECIALS)


@pytest.mark.parametrize("change, message", [
    (dict(block_size=256), r"model.block_size \(256\) exceeds .*n_positions \(128\): set model.block_size=128"),
    (dict(vocab_size=64), "model.vocab_size"), (dict(block_size=128, vocab_size=None), None)])
def test_import_reads_the_shape_and_refuses_what_it_cannot_hold(tmp_path, change, message):
    """The user restates nothing: the shape is config.json's; only the training context and an explicit
    vocabulary must fit it."""
    random_gpt2(tmp_path)
    model = ModelConfig(init_from=f"hf:{tmp_path}", n_layer=7, n_embd=64, **change)
    if message is None:
        shape = check_pretrained(model, 305)
        assert (shape.n_layer, shape.n_embd, shape.vocab_size) == (2, 32, 320)
        return
    with pytest.raises(ValueError, match=message):
        check_pretrained(model, 305)


def test_import_refuses_what_is_not_a_local_gpt2(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from is 'gpt2': it must be null or hf:/path"):
        ModelConfig.parse({"init_from": "gpt2"})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ModelConfig.parse({"init_from": f"hf:{tmp_path / 'missing'}"}).init_dir()
    assert ModelConfig().init_dir() is None and ModelConfig(init_from=f"hf:{tmp_path}").init_dir() == tmp_path
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="architectures=.*'bert'.*computes"):
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}"), 300)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json lacks hidden_size"):
        check_pretrained(ModelConfig(init_from=f"hf:{tmp_path}"), 300)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        import_tokenizer(tmp_path, SPECIALS)


def test_tokenizer_and_pretrain_stages_start_from_an_imported_gpt2(micro_chain, tmp_path, monkeypatch):
    """`model.init_from=hf:DIR`: the tokenizer stage takes DIR's tokenizer (+ special tokens), pretrain its weights."""
    from stages import run_stage

    hf_dir = tmp_path / "gpt2"
    hf = random_gpt2(hf_dir, activation_function="gelu")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(micro_chain / "data" / "prepared", work / "data" / "prepared")
    monkeypatch.chdir(work)
    cfg = compose_micro(f"model.init_from=hf:{hf_dir}", "pretrain.max_steps=2", "pretrain.val_every=2")
    run_stage("tokenizer", cfg)
    n = hf.config.vocab_size
    assert Tokenizer.from_file(str(TOKENIZER_FILE)).token_to_id("<|end|>") == n + 4
    metrics = run_stage("pretrain", cfg)
    assert metrics["train_loss"] < metrics["ln_vocab"] + 1
    model, meta = load_gpt("pretrain")
    assert meta["model"]["vocab_size"] == 320  # 300 + 5 special tokens, padded to 64
    shutil.copy(micro_chain / TOKENIZER_FILE, TOKENIZER_FILE)  # a tokenizer that is not DIR's: refused
    with pytest.raises(ValueError, match="dvc repro tokenizer"):
        run_stage("pretrain", cfg)


def test_export_then_import_round_trips(pipeline_side, exported):
    model, tok = pipeline_side
    back = load_pretrained(GPT(model.config).eval(), exported)
    ids = torch.randint(0, tok.vocab_size, (2, 64))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_import_without_transformers_says_how_to_install(monkeypatch):
    import sys

    from pipeline.interop.hf import require_transformers
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra looks like
    with pytest.raises(ImportError, match=r"pip install -e '\.\[export\]'"):
        require_transformers()
