"""The `evaluate` config group: how many problems, the answer budgets, the prompting templates and the verdict's
KL bound."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from pipeline.config.schema import Schema

Count = Annotated[int, Field(ge=1)]


class PromptsConfig(Schema):
    """How each problem is asked (`evaluate.prompts`): `str.format` templates where `{question}` is the
    problem's text and `{trigger}` the chain-of-thought phrase the SFT data used (data.cot.trigger)."""

    where = "evaluate.prompts"

    zero_shot: str = "{question}"
    cot: str = "{question} {trigger}"
    shots: Annotated[int, Field(ge=0)] = 3
    """Few-shot: k solved SFT problems of the same family as earlier turns."""

    @field_validator("zero_shot", "cot")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{question}" not in template:
            raise ValueError("it must contain {question}")
        try:
            template.format(question="", trigger="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"it is not a valid template: {err}; use only {{question}} and {{trigger}}") from None
        return template


class EvaluateConfig(Schema):
    """The `evaluate` config group: every checkpoint scored on the same eval prompts."""

    where = "evaluate"

    max_problems: Count = 400
    """Eval-split problems scored per checkpoint."""
    batch_size: Count = 100
    max_new_tokens: Count = 16
    """The answer budget of a direct reply."""
    cot_max_new_tokens: Count = 80
    """The budget of a worked (chain-of-thought) reply."""
    samples: Annotated[int, Field(ge=0)] = 400
    """Eval prompts answered by sampling (temperature 1) for reward and KL to SFT."""
    prompts: PromptsConfig = PromptsConfig()
    kl_bound: Annotated[float, Field(gt=0)] = 2.0
    """The verdict flags a KL to SFT above this (nats per response), whichever method aligned."""
