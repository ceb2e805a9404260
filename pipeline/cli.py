"""`gpt-pipeline`: talk to a trained checkpoint, or export it for transformers.

    gpt-pipeline chat --stage aligned       # interactive; /reset, /temp 0.7, /topk 20, /topp 0.9, /rep 1.2, /quit
    gpt-pipeline generate --stage sft --prompt "What is 12 + 30?"
    gpt-pipeline export --stage aligned --out hf/       # a transformers directory (pipeline/interop/hf.py)
    gpt-pipeline serve --stage aligned --port 8000      # an OpenAI-compatible API and a chat page (pipeline/serving)
    gpt-pipeline lm-eval                                # artifacts/export through lm-evaluation-harness

Run anywhere in a workspace: the CLI first moves to its root, the nearest directory at or above the working
one holding dvc.yaml or params.yaml (`pipeline.paths.workspace_root`), and reads checkpoints and the tokenizer
from its `artifacts/`; paths typed on the command line (`export --out`, lm-eval's) stay relative to where they
were typed. `--stage` names a language-model checkpoint of the chain (pipeline.inference.chat keeps the
conversation). Sampling is greedy by default (`--temperature 0`), in chat as in generate, the way `evaluate`
decodes; `--help` shows every default. The model runs on the workspace's `trainer.accelerator` in its
`trainer.precision` (params.yaml, else conf/), on one device.
At a terminal, chat edits lines and recalls earlier ones (arrows, Ctrl-R) through `readline`, its history kept
in ~/.gpt_pipeline_history; piped input, or a Python without readline, reads plain lines. Replies and the
export's result go to stdout, errors to stderr. Bad input (a missing checkpoint, a prompt or
`--max-new-tokens` the model's context cannot hold: pipeline.inference.chat) exits with status 2 and one line
naming the fix, no traceback; in chat, a question refused that way is reported and the conversation goes on.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config.load import compose, load_params
from pipeline.config.root import Config, load_config
from pipeline.data.tokenizer import ChatTokenizer, load_tokenizer
from pipeline.inference.chat import HELP, Chat
from pipeline.inference.placement import Placement
from pipeline.inference.sampling import SamplingConfig
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt
from pipeline.paths import PARAMS_FILE, user_path, workspace_root
from stages import registry

HISTORY_FILE = Path("~/.gpt_pipeline_history")
HISTORY_LENGTH = 1000  # lines kept

log = logging.getLogger(__name__)


def _config() -> Config:
    return load_config(load_params() if PARAMS_FILE.is_file() else compose())  # the workspace's params, else conf/


def _load(args: argparse.Namespace) -> tuple[GPT, ChatTokenizer, SamplingConfig, Placement]:
    cfg = _config()
    placement = Placement.from_config(cfg.trainer)  # an accelerator this machine lacks is refused before loading
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    model, _ = load_gpt(args.stage, tok.sha256, registry().producer(args.stage))
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    return placement.place(model), tok, sampling, placement


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one (not "None" after a required or optional text)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpt-pipeline", description="Talk to a trained checkpoint, or export it.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = [c.name for c in registry().checkpoints("gpt")]
    checkpoint = "the checkpoint of the chain to load"
    for name, text in (("chat", "interactive conversation"), ("generate", "one reply to --prompt")):
        p = sub.add_parser(name, help=text, formatter_class=DefaultsHelp)
        p.add_argument("--stage", default="aligned", choices=models, help=checkpoint)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as evaluate decodes")
        p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens; 0 = all")
        p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass; 1 = all")
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; e.g. 1.2")
        p.add_argument("--max-new-tokens", type=int, default=64,
                       help="most tokens in a reply; the prompt and the reply share the model's context")
        p.add_argument("--seed", type=int, default=0, help="of the sampler (with --temperature > 0)")
        p.add_argument("--system", default=None, help="a system message opening the conversation")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the question")
    from pipeline.evaluation import lmeval
    lmeval.add_arguments(sub.add_parser("lm-eval", formatter_class=DefaultsHelp,
                                        help="evaluate an export with EleutherAI's lm-evaluation-harness "
                                        "(pip install 'gpt-pipeline[lm-eval]')"))
    from pipeline.serving import add_arguments as serve_arguments
    serve_arguments(sub.add_parser("serve", formatter_class=DefaultsHelp, help="an OpenAI-compatible API and a chat "
                                   "page (pip install 'gpt-pipeline[serve]')"), models)
    p = sub.add_parser("export", formatter_class=DefaultsHelp,
                       help="write a checkpoint as a transformers directory (GPT-2 or Llama family)")
    p.add_argument("--stage", default="aligned", choices=models, help=checkpoint)
    p.add_argument("--out", required=True, type=user_path,
                   help="directory to write (replaced if it holds an earlier export)")
    return parser.parse_args(argv)


@contextmanager
def line_editing(history: Path = HISTORY_FILE) -> Iterator[None]:
    """`input()` with readline's editing and the history in `history` (read now, written on exit), when stdin is a
    terminal and this Python has readline (not on Windows); plain `input()` otherwise."""
    if not sys.stdin.isatty():
        yield
        return
    try:
        import readline  # imported only here: at import, it takes over the terminal
    except ImportError:
        yield
        return
    history = history.expanduser()
    try:
        readline.read_history_file(history)
    except OSError:  # the first session
        pass
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield
    finally:
        try:
            readline.write_history_file(history)
        except OSError as err:
            log.warning("chat history not saved to %s: %s", history, err)


def converse(chat: Chat) -> int:
    """Read lines until /quit or end of input: a /command's answer or the streamed reply to each."""
    with line_editing():
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
            try:
                chat.reply(line)
            except ValueError as err:  # a question the context cannot hold: say so, and go on
                print(f"gpt-pipeline: {err}", file=sys.stderr)


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


def serve(args: argparse.Namespace) -> int:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpt-pipeline serve: {', '.join(missing)} not installed: pip install 'gpt-pipeline[serve]'",
              file=sys.stderr)
        return 2
    from pipeline.serving import serve as run_server
    try:
        return run_server(args, _config())
    except (FileNotFoundError, ValueError) as err:
        print(f"gpt-pipeline: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before moving: a typed path is rebased from where it was typed (paths.user_path)
    os.chdir(workspace_root())
    if args.command == "export":
        return export(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "lm-eval":
        from pipeline.evaluation import lmeval
        return lmeval.run(args)
    try:
        model, tok, sampling, placement = _load(args)
        chat = Chat(model, tok, sampling, args.seed, placement, system=args.system)
        if args.command == "generate":
            chat.reply(args.prompt)
            return 0
    except (FileNotFoundError, ValueError) as err:
        print(f"gpt-pipeline: {err}", file=sys.stderr)
        return 2
    print(f"chatting with checkpoint {args.stage!r} ({sum(p.numel() for p in model.parameters()):,} params); {HELP}")
    return converse(chat)


if __name__ == "__main__":
    raise SystemExit(main())
