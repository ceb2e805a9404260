"""The loggers and callbacks of a training stage's Trainer, built from the `logger` and `callbacks` groups.

Every entry (pipeline.config.loggers) is built by `hydra.utils.instantiate` from its `_target_` and arguments.
For the loggers it knows, the pipeline adds what depends on the stage and the run, where the entry leaves it
out:

| logger            | added                                                                                   |
|-------------------|-----------------------------------------------------------------------------------------|
| WandbLogger       | the stage's run (pipeline.config.identity.wandb_init_kwargs): group = run id, job_type = |
|                   | stage, name, config; `id` and `resume="allow"`, so a resumed stage continues its run     |
| DVCLiveLogger     | always: dir = dvclive/<stage> (dvc.yaml declares its files), resume (a resumed stage      |
|                   | continues them), dvcyaml=False (dvc.yaml is generated), save_dvc_exp=False               |
| CSVLogger,        | name = the stage                                                                        |
| TensorBoardLogger |                                                                                         |
| MLFlowLogger      | run_name = <stage>-<run id>, tags = the run identity                                    |

The stage's resolved config reaches each logger once: W&B's run at init, DVCLive none (DVC tracks params.yaml,
whose keys are the stages' params), every other logger through `log_hyperparams`, flattened. The modules do
not call `save_hyperparameters`: their arguments are the config's parts.

`check` builds them all once before a training stage starts, so that a target that does not import, lacks its
package (mlflow) or rejects an argument stops the stage before any work, naming the entry.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import paths
from pipeline.config.identity import run_identity, wandb_init_kwargs
from pipeline.io import flatten

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from pipeline.config.loggers import Instantiable
    from pipeline.config.root import Config

log = logging.getLogger(__name__)


def _stage_arguments(cls: type, cfg: Config, stage: str, run_id: str | None, resuming: bool) -> tuple[dict, dict]:
    """(arguments the entry may override, arguments the pipeline always sets) for a logger of class `cls`."""
    from lightning.pytorch import loggers as pl_loggers

    if issubclass(cls, pl_loggers.WandbLogger):  # save_dir absolute: W&B's service keeps its first job's directory
        kwargs = wandb_init_kwargs(cfg, stage)
        save_dir = kwargs.pop("dir")
        resume = {"id": run_id, "resume": "allow" if run_id else None}
        return {"log_model": False, **kwargs}, {"save_dir": save_dir, **resume}
    if cls.__module__.startswith("dvclive"):
        return ({"run_name": stage},  # the progress bar's v_num shows its last 4 characters
                {"dir": str(paths.live_dir(stage)), "resume": resuming, "dvcyaml": False, "save_dvc_exp": False})
    if issubclass(cls, (pl_loggers.CSVLogger, pl_loggers.TensorBoardLogger)):
        return {"name": stage}, {}
    if issubclass(cls, pl_loggers.MLFlowLogger):
        identity = run_identity(cfg)
        tags = {"stage": stage, **{k: str(v) for k, v in identity.items() if v is not None}}
        return {"run_name": f"{stage}-{identity['run_id']}", "tags": tags}, {}
    return {}, {}


def _build(where: str, entry: Instantiable, extra: dict | None = None, fixed: dict | None = None) -> Any:
    """`entry` built by Hydra with `extra` under its own arguments and `fixed` over them; errors name `where`.
    Hydra instantiates the entry's own arguments (a nested `_target_` among them too); the pipeline's go to the
    result as they are (W&B's `config` holds every entry's `_target_`, which must stay text)."""
    from hydra.utils import instantiate

    own = entry.arguments()
    added = {**{k: v for k, v in (extra or {}).items() if k not in own}, **(fixed or {})}
    try:
        factory = instantiate({"_target_": entry.target, **{k: v for k, v in own.items() if k not in added}},
                              _partial_=True, _convert_="all")
        return factory(**added)
    except Exception as err:  # Hydra wraps the target's own error (a missing package, a bad argument)
        cause = err.__cause__ or err
        raise ValueError(f"{where}: cannot build {entry.target}: {cause}; fix {where} in conf/ "
                         f"or leave it out") from None


def _target_class(where: str, entry: Instantiable) -> type | None:
    """The class `entry` names (None for a function); ValueError naming `where` when it does not import."""
    module, _, name = entry.target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{where}._target_ {entry.target!r} does not import ({err}): name a class by its module "
                         "path, e.g. lightning.pytorch.loggers.CSVLogger") from None
    return obj if isinstance(obj, type) else None


def build_loggers(cfg: Config, stage: str, run_id: str | None = None, resuming: bool = False) -> list[Logger]:
    """The stage's loggers, in the order configured (W&B first). `run_id` is the stage's W&B run id
    (pipeline.training.resume); `resuming`: a resumed stage continues DVCLive's files instead of clearing them."""
    from lightning.pytorch.loggers import WandbLogger

    built = []
    for name, entry in cfg.logger.entries().items():
        cls = _target_class(f"logger.{name}", entry)
        extra, fixed = _stage_arguments(cls, cfg, stage, run_id, resuming) if cls else ({}, {})
        logger = _build(f"logger.{name}", entry, extra, fixed)
        if isinstance(logger, WandbLogger):  # Lightning always passes wandb.init(anonymous=...): wandb >= 0.19 warns
            logger._wandb_init.pop("anonymous", None)
        built.append(logger)
    return built


def log_config(loggers: list[Logger], cfg: Config) -> None:
    """The resolved config, flattened, to every logger that gets it no other way (see the module doc)."""
    from lightning.pytorch.loggers import WandbLogger

    others = [lg for lg in loggers if not (isinstance(lg, WandbLogger) or type(lg).__module__.startswith("dvclive"))]
    if others:
        flat = flatten(cfg.to_dict(), sep="/")
        for lg in others:
            lg.log_hyperparams(flat)


def build_callbacks(cfg: Config) -> list[Callback]:
    """The configured callbacks (callbacks=[...]), in order."""
    return [_build(f"callbacks.{name}", entry) for name, entry in cfg.callbacks.entries().items()]


def check(cfg: Config, stage: str) -> None:
    """Stop a training stage before work (its `check`) unless every logger and callback builds; under DVC
    (`dvc repro`, `dvc exp run`: DVC_ROOT set) the dvclive logger must be there, since dvc.yaml declares its files
    as the stage's outputs."""
    if os.environ.get("DVC_ROOT") and not cfg.logger.has_dvclive():
        chosen = ",".join(cfg.logger.names())
        raise ValueError(f"logger=[{chosen}] has no dvclive entry, but dvc.yaml declares {paths.live_dir(stage)}/ "
                         f"as this stage's plots and metrics: add it, e.g. logger=[{chosen + ',' if chosen else ''}"
                         "dvclive]")
    build_loggers(cfg, stage)
    build_callbacks(cfg)


def tidy_resumed(live_dir: Path) -> None:
    """A resumed stage re-logs the steps after its checkpoint that the killed run had logged too: keep, in each of
    DVCLive's step files, the resumed run's rows, so the file reads as one run's, in step order."""
    for path in Path(live_dir, "plots", "metrics").rglob("*.tsv"):
        header, *lines = path.read_text().splitlines()
        kept: list[tuple[int, str]] = []
        for line in lines:
            step = int(line.split("\t", 1)[0])
            while kept and kept[-1][0] >= step:  # a later row for an earlier step: the resumed run's
                kept.pop()
            kept.append((step, line))
        if len(kept) != len(lines):
            path.write_text("\n".join([header, *(line for _, line in kept)]) + "\n")
