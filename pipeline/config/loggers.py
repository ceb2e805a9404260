"""The `logger` and `callbacks` groups: Lightning loggers and callbacks as config, built by Hydra.

Each entry of either group is what `hydra.utils.instantiate` takes: `_target_` (a class or function) and its
keyword arguments, under a name of the entry's own (`logger.csv`, `callbacks.early_stopping`). Several
options of a group compose, as in the Lightning-Hydra template: `logger=[wandb,dvclive,csv]`,
`callbacks=[early_stopping,model_summary]`; conf/logger/ and conf/callbacks/ hold one file per option, each
with its entry under its own name, and `logger=none` / `callbacks=none` select nothing.

The `wandb` entry has two settings of the pipeline's besides WandbLogger's arguments: `mode` (the W&B mode
when WANDB_MODE is unset) and `artifacts` (the lineage records, pipeline.harness.tracking); both are taken out
before the logger is built. W&B runs of the stages that do not train, and the lineage, exist only while the
wandb entry does. Checking here is by shape only: whether a target imports and accepts its arguments is
checked by pipeline.training.loggers before a training stage starts, where Lightning is loaded anyway.
"""
from __future__ import annotations

import difflib
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_serializer, model_validator

from pipeline.config.schema import Schema

DVCLIVE_TARGET = "dvclive.lightning.DVCLiveLogger"


class Instantiable(Schema):
    """An entry Hydra builds: `_target_`, the dotted path of a class or function, and its keyword arguments."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, use_attribute_docstrings=True,
                              populate_by_name=True)

    OWN: ClassVar[tuple[str, ...]] = ()
    """Keys that are the pipeline's settings, not the target's arguments."""

    target: str = Field(alias="_target_")
    """The class or function, e.g. lightning.pytorch.loggers.CSVLogger."""

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:  # written back as Hydra reads it: `_target_` first
        data = handler(self)
        return {"_target_": data.pop("target"), **data}

    @model_validator(mode="after")
    def _misspelt(self):
        """An argument that is one letter off a setting this entry declares is that setting, misspelt (the target's
        own arguments are checked where the target is built)."""
        declared = [info.alias or name for name, info in type(self).model_fields.items()]
        for key in self.model_extra or {}:
            near = difflib.get_close_matches(key, declared, n=1, cutoff=0.8)
            if near:
                raise ValueError(f"@.{key} is not a setting of @: did you mean @.{near[0]}?")
        return self

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments: every key but `_target_`, less the pipeline's own (see `OWN`)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k != "_target_" and k not in self.OWN}


class WandbEntry(Instantiable):
    """`logger.wandb`: Lightning's WandbLogger (offline files under wandb/ by default) and the lineage settings."""

    OWN: ClassVar[tuple[str, ...]] = ("mode", "artifacts")

    target: str = Field("lightning.pytorch.loggers.WandbLogger", alias="_target_")
    project: str = "gpt-pipeline"
    entity: str | None = None
    save_dir: str = "."
    mode: Literal["online", "offline", "disabled"] = "offline"
    """The W&B mode when WANDB_MODE is not set in the environment (which always wins)."""
    artifacts: Literal["reference", "files", "none"] = "reference"
    """W&B artifacts with lineage: reference = each file's MD5 and location (the bytes stay in DVC) | files =
    upload copies | none."""

    @model_validator(mode="after")
    def _project(self):
        if not self.project:
            raise ValueError("@.project is empty: name the W&B project, e.g. gpt-pipeline")
        return self


class LoggerConfig(Schema):
    """`logger`: the loggers every training stage's Trainer gets, by entry name (conf/logger/*.yaml)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, use_attribute_docstrings=True)
    where = "logger"
    __pydantic_extra__: dict[str, Instantiable]

    wandb: WandbEntry | None = None
    """W&B (pipeline.training.loggers passes each stage's run identity); null = no W&B runs at all."""

    def entries(self) -> dict[str, Instantiable]:
        """Every configured logger by name, W&B's first."""
        return {**({"wandb": self.wandb} if self.wandb else {}), **(self.model_extra or {})}

    def names(self) -> list[str]:
        return list(self.entries())

    def has_dvclive(self) -> bool:
        return any(e.target == DVCLIVE_TARGET for e in self.entries().values())


class CallbacksConfig(Schema):
    """`callbacks`: Lightning callbacks added to every training stage's Trainer, by entry name
    (conf/callbacks/*.yaml). The pipeline's own (resume checkpoints, the curve record, the progress bar) are
    always there; these come after them."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, use_attribute_docstrings=True)
    where = "callbacks"
    __pydantic_extra__: dict[str, Instantiable]

    def entries(self) -> dict[str, Instantiable]:
        return dict(self.model_extra or {})
