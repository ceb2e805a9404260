"""The `peft` group (conf/peft/*.yaml): which weights a finetuning stage trains.

`none` trains every weight, as the chain always did. `lora` freezes the base model and trains low-rank
adapters on the Linear layers that `target_modules` names (Hu et al. 2021: W x + (alpha / r) B A x, B = 0 at
the start), in the stages that `stages` names, through the `peft` library (pipeline.model.lora); checkpoints
are saved with the adapters merged, so every later stage and the export read a plain model.

What the config alone cannot tell, the stages check before work (pipeline.model.lora.check_adapters): that
each target matches a Linear layer of the model being finetuned, and that each entry of `stages` names a
stage of the chain that reads `peft`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.schema import Schema

Names = Annotated[tuple[str, ...], Field(strict=False, min_length=1)]  # YAML writes a list
ALL_LINEAR = "all-linear"


class NoPeft(Schema):
    """`peft=none`: full finetuning, every weight trains."""

    name: Literal["none"] = "none"


class LoraConfig(Schema):
    """`peft=lora`: the base weights frozen, a LoRA pair (A: r x in, B: out x r) on each targeted Linear."""

    name: Literal["lora"]
    r: Annotated[int, Field(ge=1)] = 8
    """The adapters' rank."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """The update is scaled by alpha / r."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapters' input."""
    target_modules: Names = (ALL_LINEAR,)
    """Linear layers to adapt: `[all-linear]` (peft's convention: every Linear of the blocks, SwiGLU's gate
    included, not lm_head), or names and name suffixes (peft's rule): c_attn, c_proj, c_fc, c_gate (SwiGLU),
    attn.c_proj, mlp.c_proj, lm_head (untied only), or a full name such as h.0.attn.c_attn."""
    stages: Names
    """The stages that train adapters instead of every weight, e.g. [sft, reward, align]; sft_control follows
    sft (it extends the SFT run, so it trains as SFT did)."""

    @model_validator(mode="after")
    def _lists(self):
        for field in ("target_modules", "stages"):
            values = getattr(self, field)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated or not all(values):
                raise ValueError(f"@.{field} {list(values)} repeats or has an empty entry: list each once")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"@.target_modules {list(self.target_modules)}: {ALL_LINEAR} already names every "
                             "Linear of the blocks; use it alone, or list the names instead")
        if "sft_control" in self.stages:
            raise ValueError("@.stages lists sft_control: the control continues the SFT run with SFT's recipe, so it "
                             "trains adapters exactly when sft does; remove it (list sft)")
        return self


PeftConfig = Annotated[NoPeft | LoraConfig, Field(discriminator="name")]
