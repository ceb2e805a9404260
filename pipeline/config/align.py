"""What every alignment method's config has (`align`); each method's own fields come with its module's `Config`."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.config.schema import Schema
from pipeline.config.training import OptimConfig

MIN_PROMPT = 4  # <|bos|> <|user|> one token <|assistant|>: the shortest prompt there is


class MethodConfig(Schema):
    """What every alignment method's config has (its own fields come with its module's `Config`)."""

    where = "align"

    method: str
    """The method, named by its module in pipeline/alignment/methods and its file in conf/align."""
    steps: Annotated[int, Field(ge=1)]
    """Optimizer steps (offline methods) or rollout + update iterations (online RL)."""
    grad_clip: Annotated[float, Field(ge=0)] | None = 1.0
    optim: OptimConfig

    def answer_budgets(self) -> dict[str, int]:
        """Tokens the method samples after a prompt, by field (each must leave room in model.block_size)."""
        return {}
