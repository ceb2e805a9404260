"""What every alignment method's config has (`align`); each method's own fields come with its module's `Config`."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

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
    eval_every: Annotated[int, Field(ge=0)] = 0
    """Score the policy on held-out problems every this many training batches (iterations of an online method,
    optimizer steps of an offline one), before the first and after the last (pipeline.alignment.monitor); 0 = off."""
    eval_problems: Annotated[int, Field(ge=1)] | None = None
    """Eval-split problems each evaluation answers greedily; null = evaluate.max_problems (the same problems)."""
    eval_samples: Annotated[int, Field(ge=0)] | None = None
    """Of those, problems answered by sampling for the reward and the KL to SFT; null = evaluate.samples."""
    eval_completions: Annotated[int, Field(ge=0)] = 8
    """Sampled completions per evaluation in the W&B table (prompt, completion, reward, checker's verdict)."""
    keep: Literal["last", "best"] = "last"
    """Which weights become checkpoint `aligned`: the last step's, or the best evaluation's by `keep_metric`."""
    keep_metric: Literal["exact_match", "exact_match_sampled", "reward"] = "exact_match"
    """The held-out metric `keep: best` maximises."""

    @model_validator(mode="after")
    def _best_needs_evaluations(self):
        if self.keep == "best" and not self.eval_every:
            raise ValueError("@.keep is best, which needs evaluations during the run: set @.eval_every > 0 "
                             "(or @.keep=last)")
        return self

    def label(self) -> str:
        """The method as reports name it (a method with variants names the configured one)."""
        return self.method

    def answer_budgets(self) -> dict[str, int]:
        """Tokens the method samples after a prompt, by field (each must leave room in model.block_size)."""
        return {}
