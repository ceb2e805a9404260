"""The experiment logger a training stage's Trainer gets: Lightning's WandbLogger on the stage's W&B run
(pipeline.config.identity.wandb_init_kwargs), or none."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.identity import wandb_init_kwargs

if TYPE_CHECKING:
    from pipeline.config.root import Config


def build_logger(cfg: Config, stage: str, run_id: str | None = None):
    """A WandbLogger for this stage, or False (logger=none).

    `run_id` (pipeline.training.resume) is the W&B run id: a resumed stage continues its run (resume="allow")."""
    if cfg.logger.name == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    kwargs = wandb_init_kwargs(cfg, stage)
    return WandbLogger(save_dir=kwargs.pop("dir"), log_model=False, id=run_id, resume="allow" if run_id else None,
                       **kwargs)
