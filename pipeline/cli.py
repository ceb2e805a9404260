"""`gpt-pipeline`: talk to a trained checkpoint, or export it for transformers.

    gpt-pipeline chat --stage aligned       # interactive; /reset, /temp 0.7, /topk 20, /topp 0.9, /rep 1.2, /quit
    gpt-pipeline generate --stage sft --prompt "What is 12 + 30?"
    gpt-pipeline export --stage aligned --out hf/       # a transformers directory (pipeline/interop/hf.py)

Run from the project root (checkpoints and the tokenizer are read from `artifacts/`). `--stage` names a
language-model checkpoint of the chain (pipeline.inference.chat keeps the conversation). The model runs on
the workspace's `trainer.accelerator` in its `trainer.precision` (params.yaml, else conf/), on one device.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config.load import compose, load_params
from pipeline.config.root import Config, load_config
from pipeline.data.tokenizer import ChatTokenizer, load_tokenizer
from pipeline.inference.chat import HELP, Chat
from pipeline.inference.placement import Placement
from pipeline.inference.sampling import SamplingConfig
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt
from pipeline.paths import PARAMS_FILE
from stages import registry


def _config() -> Config:
    return load_config(load_params() if PARAMS_FILE.is_file() else compose())  # the workspace's params, else conf/


def _load(args: argparse.Namespace) -> tuple[GPT, ChatTokenizer, SamplingConfig, Placement]:
    cfg = _config()
    placement = Placement.from_config(cfg.trainer)  # an accelerator this machine lacks is refused before loading
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    model, _ = load_gpt(args.stage, tok.sha256, registry().producer(args.stage))
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    return placement.place(model), tok, sampling, placement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpt-pipeline", description="Talk to a trained checkpoint, or export it.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = [c.name for c in registry().checkpoints("gpt")]
    for name, text in (("chat", "interactive conversation"), ("generate", "one reply to --prompt")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--stage", default="aligned", choices=models)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; e.g. 1.2")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        if name == "generate":
            p.add_argument("--prompt", required=True)
    p = sub.add_parser("export", help="write a checkpoint as a transformers directory (GPT-2 or Llama family)")
    p.add_argument("--stage", default="aligned", choices=models)
    p.add_argument("--out", required=True, help="directory to write (replaced if it holds an earlier export)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    from pipeline.interop.hf import export_checkpoint
    try:
        out = export_checkpoint(args.stage, args.out, _config().tokenizer.special_tokens,
                                registry().producer(args.stage))
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
        model, tok, sampling, placement = _load(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"gpt-pipeline: {err}", file=sys.stderr)
        return 2
    chat = Chat(model, tok, sampling, args.seed, placement)
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
