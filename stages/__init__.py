"""The chain: one module per DVC stage, each declaring its StageSpec beside its `run` (and its `check` of the
inputs earlier stages wrote). `registry()` orders them; it is the only list of stage names.

    python -m stages.<name>     # what dvc.yaml runs: the stage on the committed params.yaml

A stage module imports only declarations at its top; what it runs is imported inside `run`/`check`, so
reading the whole chain (every stage's process does) costs no heavy import.
"""
from __future__ import annotations

from functools import cache
from typing import Any

from pipeline.registry import Chain


@cache
def registry() -> Chain:
    """The stages in chain order."""
    from stages import align, evaluate, export, prepare, pretrain, report, reward, sft, sft_control, tokenizer
    return Chain([prepare, tokenizer, pretrain, sft, reward, align, sft_control, export, evaluate, report])


def run_stage(name: str, cfg: Any) -> dict:
    """Run stage `name` (or `all`) on the composed config `cfg` (a DictConfig, mapping or Config)."""
    from pipeline.harness.runner import run_stage as run
    return run(registry(), name, cfg)


def main(name: str) -> None:
    """`python -m stages.<name>`: the stage on the committed params.yaml, errors as exit codes."""
    from pipeline.harness.runner import main as run_main
    run_main(registry(), name)
