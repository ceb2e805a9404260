"""The command lines users type: Hydra without a stage, the chat and generate console script, export.

Bad config and inputs through the stage entry points are in test_bad_input.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, chain_copy, compose_micro, venv_env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python <args>` in `cwd` with the repo importable (as `dvc repro` has it from the repo root)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=venv_env(WANDB_MODE="disabled", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)


def staged_dir(chain: Path, dest: Path) -> Path:
    """A working dir holding the chain's prepared data and tokenizer, nothing trained."""
    shutil.copytree(chain / "data", dest / "data")
    shutil.copytree(chain / "artifacts" / "tokenizer", dest / "artifacts" / "tokenizer")
    return dest


def test_stage_without_a_choice_explains_itself(tmp_path):
    proc = run(["-m", "pipeline"], tmp_path)
    assert proc.returncode == 2 and "choose a stage" in proc.stderr


def _read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    import os
    import select
    import time
    buf, end = b"", time.monotonic() + timeout
    while marker not in buf:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {buf[-500:]!r}")
        buf += os.read(fd, 4096)
    return buf


def chat_in_a_pty(chain: Path, home: Path) -> tuple[subprocess.Popen, int]:
    """`gpt-pipeline chat` on a pseudo-terminal (a real terminal to it: readline on), HOME at `home`; (process, the
    terminal's master end)."""
    import os
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "chat", "--stage", "sft", "--max-new-tokens", "6"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=chain, close_fds=True,
                            env=venv_env(PYTHONPATH=str(REPO), HOME=str(home), TERM="xterm"))
    os.close(slave)
    return proc, master


def test_chat_cli_in_a_pseudo_terminal(micro_chain, tmp_path):
    """The console script's chat, driven like a person at a terminal: a reply, commands, a clean exit; the lines
    typed are kept in ~/.gpt_pipeline_history, and the next session recalls them with the up arrow."""
    import os
    proc, master = chat_in_a_pty(micro_chain, tmp_path)
    try:
        assert b"chatting with checkpoint 'sft'" in _read_until(master, b"> ")
        os.write(master, b"What is 2 + 3?\r")
        _read_until(master, b"> ")  # the reply streamed, then the next prompt
        for command, answer in ((b"/temp 0.5", b"(temperature 0.5)"), (b"/topk x", b"bad value"),
                                (b"/rep 1.3", b"(repetition penalty 1.3)"), (b"/topp 0", b"bad value"),
                                (b"/reset", b"(conversation cleared)"), (b"/nope", b"unknown command")):
            os.write(master, command + b"\r")
            _read_until(master, answer)
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    history = (tmp_path / ".gpt_pipeline_history").read_text().splitlines()
    assert history[-3:] == ["/reset", "/nope", "/quit"] and "What is 2 + 3?" in history
    proc, master = chat_in_a_pty(micro_chain, tmp_path)
    try:
        _read_until(master, b"> ")
        os.write(master, b"\x1b[A\r")  # up arrow: the last line typed (/quit), entered again
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)


def test_generate_answers_once_and_a_missing_checkpoint_is_named(micro_chain, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    monkeypatch.chdir(micro_chain)
    assert main(["generate", "--stage", "sft", "--prompt", "What is 2 + 3?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    staged_dir(micro_chain, tmp_path / "bare")
    monkeypatch.chdir(tmp_path / "bare")
    assert main(["generate", "--stage", "aligned", "--prompt", "hi"]) == 2
    assert "dvc repro align" in capsys.readouterr().err


def test_chat_keeps_the_template_and_drops_the_oldest_turns(in_chain):
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.inference.chat import Chat
    from pipeline.inference.sampling import SamplingConfig
    from pipeline.model.handoff import load_gpt

    tok = load_tokenizer(compose_micro().tokenizer.special_tokens)
    model, _ = load_gpt("sft")
    chat = Chat(model, tok, SamplingConfig(4, 0.0), seed=0)
    streamed = []

    class Out:
        def write(self, text: str) -> None:
            streamed.append(text)

        def flush(self) -> None:
            pass

    text = chat.reply("What is 1 + 1?", out=Out())
    assert "".join(streamed).strip() == text.strip()
    first = chat.context("And 2 + 2?")
    assert first[0] == tok.bos_id and first.count(tok.user_id) == 2 and first[-1] == tok.assistant_id
    for i in range(40):  # far more history than micro's 64-token context holds
        chat.turns.append((tok.encode(f"question {i}"), tok.encode("answer") + [tok.end_id]))
    ctx = chat.context("last?")
    assert len(ctx) <= model.config.block_size - 4 and ctx[0] == tok.bos_id
    text = tok.decode(ctx)
    assert text.endswith("last?") and "question 39" in text and "question 0" not in text


# ------------------------------------------------------------------ the workspace, the context, defaults

@pytest.fixture(scope="module")
def workspace(micro_chain, tmp_path_factory) -> Path:
    """The micro chain's data and checkpoints with its params.yaml (`chain_copy`), and a subdirectory docs/notes."""
    ws = chain_copy(micro_chain, tmp_path_factory.mktemp("workspace"))
    (ws / "docs" / "notes").mkdir(parents=True)
    return ws


def test_the_cli_finds_its_workspace_from_a_subdirectory(workspace, monkeypatch):
    """Run below the directory holding params.yaml, generate reads the workspace's checkpoints and tokenizer, and
    export writes --out where the user is."""
    proc = run(["-m", "pipeline.cli", "generate", "--stage", "sft", "--prompt", "What is 2 + 3?", "--max-new-tokens",
                "4"], workspace / "docs" / "notes")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    from pipeline.cli import main
    monkeypatch.chdir(workspace / "docs" / "notes")
    assert main(["export", "--stage", "sft", "--out", "hf"]) == 0
    assert (workspace / "docs" / "notes" / "hf" / "gpt_pipeline.json").is_file()


def test_a_prompt_or_reply_the_context_cannot_hold_is_refused_naming_the_numbers(workspace, monkeypatch, capsys):
    """Never an IndexError, never a prompt cut silently (it would lose its chat header): exit 2, the message names
    the token counts and the limit."""
    from pipeline.cli import main
    from pipeline.data.tokenizer import load_tokenizer
    monkeypatch.chdir(workspace)
    cfg = compose_micro()
    block = cfg.model.block_size
    assert main(["generate", "--stage", "sft", "--prompt", "hi", "--max-new-tokens", "100000"]) == 2
    out, err = capsys.readouterr()
    assert not out and "100000" in err and f"{block} tokens" in err, err
    question = "What is 2 + 3? " * 667  # 10,005 characters
    tokens = len(load_tokenizer(cfg.tokenizer.special_tokens).prompt(question))
    assert main(["generate", "--stage", "sft", "--prompt", question, "--max-new-tokens", "16"]) == 2
    out, err = capsys.readouterr()
    assert not out and f"{tokens} tokens" in err and f"{block - 16} " in err, err


def test_chat_reports_a_prompt_too_long_and_goes_on(workspace, monkeypatch, capsys):
    from pipeline import cli
    lines = iter(["word " * 2000, "What is 2 + 3?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.chdir(workspace)
    assert cli.main(["chat", "--stage", "sft", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "tokens" in err and "shorten" in err and out.count("\n") >= 2, (out, err)


def test_chat_is_greedy_by_default_and_help_shows_the_defaults(capsys):
    from pipeline.cli import parse_args
    assert parse_args(["chat"]).temperature == 0.0 == parse_args(["generate", "--prompt", "q"]).temperature
    with pytest.raises(SystemExit) as done:
        parse_args(["chat", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    for default in ("--temperature TEMPERATURE", "(default: 0.0)", "(default: 64)", "(default: aligned)"):
        assert default in shown, shown
    assert "(default: None)" not in shown
