"""Serving: the chain's checkpoints over an OpenAI-compatible API (`app`), decoded in batches (`engine`).
(Imported by the CLI: what needs the [serve] extra is imported in `serve`.)

`gpt-pipeline serve --stage aligned --port 8000` (`serve` below) loads the workspace's tokenizer, lists the
language-model checkpoints it holds, places each on `trainer.accelerator` in `trainer.precision` when first
asked for (the default one before serving starts, so a broken checkpoint is refused at once), and runs uvicorn.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser, models: list[str]) -> None:
    p.add_argument("--stage", default="aligned", choices=models, help="the default model (every checkpoint "
                   "present is served; a request's `model` picks one)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--max-batch", type=int, default=16, help="most rows decoded together")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="how long an idle server waits for more requests before its first step (requests "
                        "also join a running batch between steps)")


def catalog(tok_sha256: str, default: str) -> dict:
    """The language-model checkpoints this workspace holds (the default one first); refuses a missing default."""
    from pipeline.model.handoff import check_checkpoint, checkpoint_dir
    from pipeline.serving.app import Checkpoint
    from stages import registry

    found: dict[str, Checkpoint] = {}
    names = [c.name for c in registry().checkpoints("gpt")]
    for name in sorted(names, key=lambda n: n != default):
        try:
            meta = check_checkpoint(name, "gpt", tok_sha256, registry().producer(name))
        except (FileNotFoundError, ValueError) as err:
            if name == default:
                raise
            log.debug("not serving %s: %s", name, err)
            continue
        found[name] = Checkpoint(name, int(meta["model"]["block_size"]),
                                 int(os.path.getmtime(checkpoint_dir(name) / "model.safetensors")))
    return found


def serve(args: argparse.Namespace, config) -> int:
    """Run the server until interrupted (`config`: the workspace's Config)."""
    import uvicorn

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.inference.placement import Placement
    from pipeline.model.handoff import load_gpt
    from pipeline.serving.app import create_app
    from pipeline.serving.engine import Engine
    from stages import registry

    placement = Placement.from_config(config.trainer)
    tok = load_tokenizer(config.tokenizer.special_tokens)
    checkpoints = catalog(tok.sha256, args.stage)

    def load(name: str):
        model, _ = load_gpt(name, tok.sha256, registry().producer(name))
        return placement.place(model)

    engine = Engine(load, tok, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                    autocast=placement.autocast)
    engine.model(args.stage)  # loaded before serving: a checkpoint that can't load is refused now
    engine.start()
    app = create_app(tok, engine, checkpoints, args.stage)
    log.info("serving %s on http://%s:%d (also %s) on %s", args.stage, args.host, args.port,
             ", ".join(n for n in checkpoints if n != args.stage) or "no other checkpoint", placement.device)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0
