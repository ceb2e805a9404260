"""Checks of a stage's inputs before work: what earlier stages wrote, as the stage's StageSpec declares it.

Config is checked when it is loaded (pipeline.config.root); what remains is the disk. `check_inputs`
refuses, within a second and with nothing written, a missing or damaged tokenizer, an upstream checkpoint
that is missing, damaged, of the wrong kind or from another tokenizer (meta.json and the weights' header
only), and a prepared split with a line that does not parse, a row without a field its readers need, or
no rows; each message names the file (and line) and the stage to rerun. The checks only one or two stages
need (token shards, SFT conversation lengths) are here too, called from those stages' `check`; evaluate's
prompt lengths are checked beside evaluate (pipeline.evaluation.evaluate.check_prompts).

Stage modules call these from their `check(cfg, spec)`: this module is imported only by the stages that
read such inputs, so that code is in no other stage's import closure (pipeline.harness.imports).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.data.splits import SPLIT_FILES, load_split
from pipeline.data.tokenizer import ChatTokenizer, load_tokenizer
from pipeline.model.handoff import check_checkpoint

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec


@dataclass(frozen=True)
class Inputs:
    """What `check_inputs` read, for a stage's own further checks."""

    tok: ChatTokenizer
    metas: dict[str, dict]
    """Each checkpoint's meta.json."""
    rows: dict[str, list[dict]]
    """Each split's rows."""

    def block_size(self, checkpoint: str) -> int:
        """The context length checkpoint `checkpoint` was built with (its meta.json `model.block_size`)."""
        return int(self.metas[checkpoint]["model"]["block_size"])


def check_inputs(cfg: Config, spec: StageSpec) -> Inputs:
    """The tokenizer, every checkpoint `spec` reads under `cfg` and every split it reads, each checked."""
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    metas = {name: check_checkpoint(name, kind, tok.sha256, spec.producers.get(name))
             for name, kind in spec.checkpoints_read(cfg).items()}
    rows = {split: load_split(paths.PREPARED, split) for split in spec.splits_read(cfg)}
    return Inputs(tok, metas, rows)


def check_token_shards(tok: ChatTokenizer) -> None:
    """Pretraining's token shards must come from the workspace's tokenizer."""
    for split in ("pretrain", "pretrain_val"):
        path = paths.TOKENS / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the tokenizer stage first (dvc repro tokenizer)")
        try:
            written_by = json.loads(path.read_text()).get("tokenizer_sha256")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{path} is damaged ({err}): rerun `dvc repro tokenizer`") from None
        if written_by != tok.sha256:
            raise ValueError(f"{path} was written by another tokenizer than the workspace's: rerun "
                             "`dvc repro tokenizer`")


def check_conversation_lengths(rows: list[dict], tok: ChatTokenizer, block: int) -> None:
    """Every SFT conversation must fit in model.block_size (row i is line i + 1: prepare writes no blank lines).
    Under the pipeline's template a byte-level token spans at least one byte and a message adds at most two
    special tokens, so only conversations whose bytes could exceed `block` are tokenized; a checkpoint's own
    template (TemplateTokenizer) adds text of its own, so every conversation is."""
    path = paths.PREPARED / SPLIT_FILES["sft"]
    bounded = type(tok) is ChatTokenizer
    for i, row in enumerate(rows):
        try:
            if bounded and 1 + sum(len(m["content"].encode()) + 2 for m in row["messages"]) <= block:
                continue
            n = len(tok.chat(row["messages"])[0])
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{i + 1}: field 'messages' must be a list of {{role, content}} messages: "
                             "rerun `dvc repro prepare`") from None
        if n > block:
            raise ValueError(f"{path}:{i + 1}: the conversation has {n} tokens, more than model.block_size "
                             f"({block}): raise model.block_size, or drop such rows (data.sources.sft.max_chars "
                             "for hub data) and rerun `dvc repro prepare`")
