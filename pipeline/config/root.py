"""The whole configuration, typed: every group's schema in one `Config`, loaded (and so checked) once.

`load_config` turns the composed config (params.yaml under `dvc repro`, conf/ under `python -m pipeline`)
into a `Config` before a stage does anything: a wrong type, an out-of-range value, an unknown key (named
with the nearest valid one) or two groups that disagree (an answer budget that leaves no room in
model.block_size) stops it with one line per problem. This module assembles the groups' schemas and
checks what spans groups.

The `align` group is the one exception: its fields are the configured method's
(`pipeline.alignment.methods`), and a method's module imports Lightning, so here `align` only names
its method; the stages that align (and the control that matches them) check the rest before work.
"""
from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import ConfigDict, model_validator

from pipeline.config.align import MIN_PROMPT
from pipeline.config.data import DataConfig, TokenizerConfig
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.loggers import CallbacksConfig, LoggerConfig
from pipeline.config.model import ModelConfig
from pipeline.config.peft import NoPeft, PeftConfig
from pipeline.config.schema import Schema
from pipeline.config.training import (
    PretrainConfig,
    ResumeConfig,
    RewardConfig,
    SFTConfig,
    StrategyConfig,
    TrainerConfig,
)


class RunConfig(Schema):
    """`run`: the pipeline run's identity."""

    id: str | None = None
    """The run id (W&B group, checkpoint meta, metrics, report); null = run-<commit>-<config hash>."""


class AlignSelection(Schema):
    """`align`: which alignment method; the rest of the group is that method's (checked by its `Config`)."""

    model_config = ConfigDict(extra="allow")

    method: str
    """ppo, dpo, grpo...: a module of pipeline/alignment/methods, chosen with align=<name> (conf/align/)."""


class Config(Schema):
    """The composed configuration (conf/config.yaml and its groups), as every stage receives it."""

    stage: str | None = None
    """Which stage `python -m pipeline` runs (prepare ... report, or all); unused under dvc repro."""
    seed: Annotated[int, Ge(0), Le(2**32 - 1)]
    """The global seed: model init, data order and sampling (an unsigned 32-bit integer, as NumPy's seeds are)."""
    run: RunConfig = RunConfig()
    resume: ResumeConfig = ResumeConfig()
    tokenizer: TokenizerConfig
    pretrain: PretrainConfig
    sft: SFTConfig
    reward: RewardConfig
    evaluate: EvaluateConfig
    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    strategy: StrategyConfig
    logger: LoggerConfig = LoggerConfig()
    """The training stages' loggers, by name (logger=[wandb,dvclive] by default; pipeline.config.loggers)."""
    callbacks: CallbacksConfig = CallbacksConfig()
    """Lightning callbacks every training stage adds, by name (callbacks=[early_stopping,...])."""
    align: AlignSelection
    peft: PeftConfig = NoPeft()
    """Full finetuning (none) or LoRA adapters (lora) in the stages it names (pipeline.config.peft)."""

    @model_validator(mode="after")
    def _groups_agree(self):
        if self.model.init_from is None and self.tokenizer.vocab_size < self.tokenizer.min_vocab():
            raise ValueError(f"tokenizer.vocab_size is {self.tokenizer.vocab_size}: it must be >= "
                             f"{self.tokenizer.min_vocab()} (the 256 bytes and {len(self.tokenizer.special_tokens)} "
                             f"special tokens); set tokenizer.vocab_size to {self.tokenizer.min_vocab()} or more")
        if self.pretrain.max_steps == 0 and self.model.init_from is None:
            raise ValueError("pretrain.max_steps is 0 but model.init_from is null: there are no pretrained weights "
                             "to hand on; set model.init_from=hf:DIR or pretrain.max_steps to 1 or more")
        block = self.model.block_size
        budgets = {"reward.on_policy.max_new_tokens": self.reward.on_policy.max_new_tokens,
                   "evaluate.max_new_tokens": self.evaluate.max_new_tokens,
                   "evaluate.cot_max_new_tokens": self.evaluate.cot_max_new_tokens}
        for field, budget in budgets.items():
            if MIN_PROMPT + budget > block:
                raise ValueError(f"{field} ({budget}) leaves no room for a prompt in model.block_size ({block}): "
                                 f"lower {field} below {block - MIN_PROMPT} or raise model.block_size")
        return self


def load_config(raw: Any) -> Config:
    """Check the composed config (a DictConfig or a mapping) into a `Config`; ConfigError names every problem."""
    if isinstance(raw, Config):
        return raw
    if hasattr(raw, "_metadata"):
        from omegaconf import OmegaConf
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = {k: v for k, v in dict(raw).items() if k != "hydra"}  # Hydra's own node, when a caller kept it
    return Config.parse(raw, where="")
