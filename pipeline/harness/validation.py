"""Checks of a stage's inputs before work: what earlier stages wrote, as the stage's StageSpec declares it.

Config is checked when it is loaded (pipeline.config.root); what remains is the disk. `check_inputs`
refuses, within a second and with nothing written, a missing or damaged tokenizer, an upstream checkpoint
that is missing, damaged, of the wrong kind, from another tokenizer or whose weights are not the shapes its
meta.json describes (meta.json and the weights' header only), a prepared split with a line that does not parse,
a row without a field its readers need (or of another type), no rows or another number of rows than the
manifest records, and a symbolic link that leads nowhere (a loop, a missing target) anywhere under the inputs
it reads, which the stage itself may never open but DVC and the W&B lineage walk. Each message names the file
(and line) and the stage to rerun. The checks only one or two stages need (SFT conversation lengths, the
prompts a stage samples after) are here too, called from those stages' `check`; evaluate's prompt lengths are
checked beside evaluate (pipeline.evaluation.evaluate.check_prompts), the token shards beside their reader
(pipeline.data.shards.check_token_shards), the pretraining corpus by the tokenizer stage's own `check` (which
imports no torch).

Stage modules call these from their `check(cfg, spec)`: this module is imported only by the stages that
read such inputs, so that code is in no other stage's import closure (pipeline.harness.imports).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.data.splits import SPLIT_FILES, load_split
from pipeline.data.tokenizer import ChatTokenizer, bounded_length, load_tokenizer
from pipeline.input_files import check_links
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
    reads = spec.checkpoints_read(cfg)
    check_links([*spec.inputs, *(paths.checkpoint_dir(name) for name in reads)])
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    metas = {name: check_checkpoint(name, kind, tok.sha256, spec.producers.get(name)) for name, kind in reads.items()}
    rows = {split: load_split(paths.PREPARED, split) for split in spec.splits_read(cfg)}
    return Inputs(tok, metas, rows)


def check_conversation_lengths(rows: list[dict], tok: ChatTokenizer, block: int) -> None:
    """Every SFT conversation must fit in model.block_size (row i is line i + 1: prepare writes no blank lines).
    Under the pipeline's template a message adds at most two special tokens, so only conversations the bytes do not
    decide are tokenized (`bounded_length`); a checkpoint's own template (TemplateTokenizer) adds text of its own, so
    every conversation is."""
    path = paths.PREPARED / SPLIT_FILES["sft"]
    for i, row in enumerate(rows):
        try:
            nbytes = sum(len(m["content"].encode()) for m in row["messages"])
            n, qualifier = bounded_length(tok, nbytes, 1 + 2 * len(row["messages"]), block,
                                          lambda row=row: len(tok.chat(row["messages"])[0]))
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{i + 1}: field 'messages' must be a list of {{role, content}} messages: "
                             "rerun `dvc repro prepare`") from None
        if n > block:
            raise ValueError(f"{path}:{i + 1}: the conversation has {qualifier}{n} tokens, more than model.block_size "
                             f"({block}): raise model.block_size, or drop such rows (data.sources.sft.max_chars "
                             "for hub data) and rerun `dvc repro prepare`")


def check_prompt_room(rows: list[dict], split: str, tok: ChatTokenizer, block: int, room: int, needs: str) -> None:
    """Each row's prompt, asked as `tok.prompt` asks it, must leave `room` tokens of model.block_size for what
    `needs` them (a sampled answer's budget, a preference pair's reply): a prompt that does not would fail the
    sampling midway (or leave a pair with no reply to score)."""
    path = paths.PREPARED / SPLIT_FILES[split]
    for i, row in enumerate(rows):
        n, qualifier = bounded_length(tok, len(row["prompt"].encode()), 3, block - room,
                                      lambda row=row: len(tok.prompt(row["prompt"])))
        if n + room > block:
            raise ValueError(f"{path}:{i + 1}: the prompt has {qualifier}{n} tokens, and {needs} must fit after it "
                             f"in model.block_size ({block}): raise model.block_size, or drop such rows "
                             f"(data.sources.{split}.max_chars for hub data) and rerun `dvc repro prepare`")


def check_sampled_prompts(inputs: Inputs, block: int, budgets: dict[str, int]) -> None:
    """The prompts of the splits a preference or RL stage read: each preference pair's must leave room for a reply,
    each RL prompt's for the largest of `budgets` ({setting: tokens sampled after a prompt})."""
    if "preference" in inputs.rows:
        check_prompt_room(inputs.rows["preference"], "preference", inputs.tok, block, 1, "a reply")
    if "rl_prompts" in inputs.rows:
        setting, budget = max(budgets.items(), key=lambda kv: kv[1], default=("", 1))
        check_prompt_room(inputs.rows["rl_prompts"], "rl_prompts", inputs.tok, block, budget,
                          f"{setting} ({budget})" if setting else "an answer")
