"""The shared writers (pipeline/io.py): what they leave on disk is readable to whoever a plain open() would let
read it, whatever library wrote each file (safetensors writes 0600 on its own)."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config.model import GPTConfig
from pipeline.data.tokenizer import ChatTokenizer, train_bpe
from pipeline.interop.hf import export_model
from pipeline.io import atomic_dir, default_file_mode, write_json
from pipeline.model.gpt import GPT
from pipeline.model.handoff import save_checkpoint

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=["022", "027", "002"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    assert default_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # read, and left as it was
    with atomic_dir(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        os.close(os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600))  # as mkstemp creates
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "plain.txt").write_text("x")
    out = tmp_path / "out"
    for f in ("model.safetensors", "private", "sub/plain.txt"):
        assert mode(out / f) == 0o666 & ~umask, (f, oct(mode(out / f)))
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    write_json(tmp_path / "m.json", {"a": 1})
    assert mode(tmp_path / "m.json") == 0o666 & ~umask


def test_a_checkpoint_and_an_export_are_readable_by_the_group_under_umask_027(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_bpe(["What is 12 + 30? It is 42."] * 20, 300, SPECIALS).save(str(tmp_path / "tokenizer.json"))
    tok = ChatTokenizer.load(tmp_path / "tokenizer.json", SPECIALS)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=1, n_embd=8))
    old = os.umask(0o027)
    try:
        save_checkpoint("sft", model, {"kind": "gpt"})
        export_model(model, tok, tmp_path / "tokenizer.json", tmp_path / "hf")
    finally:
        os.umask(old)
    written = [*(tmp_path / "artifacts" / "sft").iterdir(), *(tmp_path / "hf").iterdir()]
    assert {p.name for p in written} >= {"model.safetensors", "meta.json", "config.json", "tokenizer_config.json"}
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o640) for p in written}
