"""Bring your own model, end to end: the micro chain on a tiny local Llama directory with its own chat template
(`model.init_from=hf:DIR`, `pretrain.max_steps=0`) runs every stage; the pretrain checkpoint is the source
model unchanged, the tokenizer is DIR's with DIR's template, and the aligned export loads as
`LlamaForCausalLM` with the pipeline's own logits and the same chat rendering."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.data.splits import load_split
from pipeline.data.tokenizer import load_tokenizer
from pipeline.model.handoff import load_gpt
from pipeline.paths import CHAT_TEMPLATE_FILE, EXPORT_DIR, TOKENIZER_FILE
from stages import registry, run_stage

from byom import tiny_llama_dir
from conftest import compose_micro

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_chain(micro_chain, tmp_path_factory) -> tuple[Path, Path]:
    """(the Llama directory, the workspace where every stage after prepare ran on it)."""
    root = tmp_path_factory.mktemp("byom")
    work = root / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(micro_chain / "data" / "prepared", work / "data" / "prepared")
    texts = [r["text"] for r in load_split(work / "data" / "prepared", "pretrain")]
    source = tiny_llama_dir(root / "llama", texts)
    old = Path.cwd()
    os.chdir(work)
    try:
        cfg = compose_micro(f"model.init_from=hf:{source}", "pretrain.max_steps=0")
        for name in registry().names:
            if name != "prepare":
                run_stage(name, cfg)
    finally:
        os.chdir(old)
    return source, work


def test_every_stage_ran_on_the_imported_llama(llama_chain, monkeypatch):
    source, work = llama_chain
    monkeypatch.chdir(work)
    for name in registry().names:
        assert name == "prepare" or (work / "metrics" / f"{name}.json").is_file(), name  # prepare: shared data
    tok = load_tokenizer(compose_micro().tokenizer.special_tokens)
    assert CHAT_TEMPLATE_FILE.read_text() == transformers.AutoTokenizer.from_pretrained(str(source)).chat_template
    assert TOKENIZER_FILE.is_file() and tok.vocab_size == json.loads((source / "config.json").read_text())["vocab_size"]
    meta = json.loads((work / "artifacts" / "aligned" / "meta.json").read_text())
    assert meta["model"]["architecture"] == "LlamaForCausalLM" and meta["model"]["n_kv_head"] == 2
    sft = json.loads((work / "metrics" / "sft.json").read_text())
    assert sft["train_loss"] < sft["first_train_loss"]  # SFT on the template's assistant spans learned something


def test_pretrain_with_no_steps_hands_on_the_source_weights(llama_chain, monkeypatch):
    source, work = llama_chain
    monkeypatch.chdir(work)
    model, meta = load_gpt("pretrain")
    assert meta["step"] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5


def test_aligned_export_loads_as_llama_with_the_pipelines_logits_and_template(llama_chain, monkeypatch):
    _, work = llama_chain
    monkeypatch.chdir(work)
    tok = load_tokenizer(compose_micro().tokenizer.special_tokens)
    model, _ = load_gpt("aligned", tok.sha256)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(EXPORT_DIR), local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(EXPORT_DIR), local_files_only=True)
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(rendered) == tok.chat(messages)[0]
    assert json.loads((work / "metrics" / "export.json").read_text())["architecture"] == "LlamaForCausalLM"
