"""`gpt-pipeline`: talk to a trained checkpoint, or export it for transformers.

    gpt-pipeline chat --stage aligned              # interactive; /reset, /temp 0.7, /topk 20, /topp 0.9, /rep 1.2, /quit
    gpt-pipeline generate --stage sft --prompt "What is 12 + 30?"
    gpt-pipeline export --stage aligned --out hf/       # a transformers GPT-2 directory (pipeline/hf.py)

Run from the project root (checkpoints and the tokenizer are read from `artifacts/`). Replies stream
token by token as they are sampled. The conversation is kept in the chat template:
<|bos|> <|user|> q1 <|assistant|> a1 <|end|> <|user|> q2 <|assistant|> ..., and the oldest turns are
dropped when it would no longer fit the model's context.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.checkpoint import CHECKPOINTS, load_gpt
from pipeline.config import PARAMS_FILE, compose, load_params
from pipeline.context import load_tokenizer
from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.model import GPT

# /command -> (SamplingConfig field, type, how the confirmation names it)
SETTINGS = {"temp": ("temperature", float, "temperature"), "topk": ("top_k", int, "top-k"),
            "topp": ("top_p", float, "top-p"), "rep": ("repetition_penalty", float, "repetition penalty")}
HELP = "commands: /reset (forget the conversation), /temp T, /topk K, /topp P, /rep R (repetition penalty), /quit"


class Chat:
    """A conversation with one model: history in the chat template, streamed replies."""

    def __init__(self, model: GPT, tok: ChatTokenizer, sampling: SamplingConfig, seed: int) -> None:
        self.model, self.tok, self.sampling = model, tok, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.turns: list[tuple[list[int], list[int]]] = []  # (user ids, reply ids incl. end)

    def context(self, question: str) -> list[int]:
        """The prompt for the next reply; the oldest turns are dropped until it leaves room to answer."""
        room = self.model.config.block_size - self.sampling.max_new_tokens
        ask = [self.tok.user_id, *self.tok.encode(question), self.tok.assistant_id]
        turns = list(self.turns)
        while True:
            ids = [self.tok.bos_id] + [t for u, r in turns for t in (self.tok.user_id, *u, self.tok.assistant_id, *r)] + ask
            if len(ids) <= room or not turns:
                return ids[-room:] if len(ids) > room else ids
            turns.pop(0)

    def reply(self, question: str, out=None) -> str:
        """Sample a reply to `question`, writing it to `out` (default: the current stdout) as it is sampled;
        remember the exchange."""
        out = out or sys.stdout  # looked up per call: a default bound at import would miss redirection
        ids: list[int] = []
        shown = ""

        def stream(step: list[int]) -> None:
            nonlocal shown
            ids.append(step[0])
            text = self.tok.decode(self.tok.strip_response(ids))
            if text.startswith(shown):  # a byte-level BPE piece can complete a character later
                out.write(text[len(shown):])
                out.flush()
                shown = text

        response = generate(self.model, [self.context(question)], self.sampling, stop_id=self.tok.end_id,
                            pad_id=self.tok.pad_id, generator=self.generator, on_step=stream)[0]
        text = self.tok.decode(self.tok.strip_response(response))
        out.write(text[len(shown):] + "\n")
        out.flush()
        reply = response if self.tok.end_id in response else response + [self.tok.end_id]
        self.turns.append((self.tok.encode(question), reply))
        return text

    def command(self, line: str) -> str | None:
        """Apply a /command; return a message for the user, or None to quit."""
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit"):
            return None
        if name == "reset":
            self.turns.clear()
            return "(conversation cleared)"
        if name not in SETTINGS:
            return f"(unknown command /{name}; {HELP})"
        field, kind, label = SETTINGS[name]
        try:  # replace() re-validates, so /topp 0 or /temp -1 is refused rather than breaking sampling
            self.sampling = replace(self.sampling, **{field: kind(arg)})
        except ValueError:
            return f"(bad value {arg!r} for /{name})"
        return f"({label} {getattr(self.sampling, field)})"


def _config():
    return load_params() if Path(PARAMS_FILE).is_file() else compose()  # the workspace's params, else conf/


def _load(args: argparse.Namespace) -> tuple[GPT, ChatTokenizer, SamplingConfig]:
    cfg = _config()
    tok = load_tokenizer(cfg)
    model, _ = load_gpt(args.stage, tok.sha256)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    return model.eval(), tok, sampling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpt-pipeline", description="Talk to a trained checkpoint, or export it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("chat", "interactive conversation"), ("generate", "one reply to --prompt")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--stage", default="aligned", choices=[c for c in CHECKPOINTS if c != "reward"])
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; e.g. 1.2")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        if name == "generate":
            p.add_argument("--prompt", required=True)
    p = sub.add_parser("export", help="write a checkpoint as a transformers GPT-2 directory")
    p.add_argument("--stage", default="aligned", choices=[c for c in CHECKPOINTS if c != "reward"])
    p.add_argument("--out", required=True, help="directory to write (replaced if it holds an earlier export)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    from pipeline.hf import export_checkpoint
    try:
        out = export_checkpoint(args.stage, args.out, list(_config().tokenizer.special_tokens))
    except (FileNotFoundError, ValueError) as err:
        print(f"gpt-pipeline: {err}", file=sys.stderr)
        return 2
    print(f"exported checkpoint {args.stage!r} to {out}: load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained(...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        return export(args)
    try:
        model, tok, sampling = _load(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"gpt-pipeline: {err}", file=sys.stderr)
        return 2
    chat = Chat(model, tok, sampling, args.seed)
    if args.command == "generate":
        chat.reply(args.prompt)
        return 0
    print(f"chatting with checkpoint {args.stage!r} ({sum(p.numel() for p in model.parameters()):,} params); {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            message = chat.command(line)
            if message is None:
                return 0
            print(message)
            continue
        chat.reply(line)


if __name__ == "__main__":
    raise SystemExit(main())
