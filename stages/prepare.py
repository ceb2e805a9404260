"""Stage `prepare`: the data splits (pretraining text, SFT, preference, RL prompts, eval), generated or, per
`data.sources`, read from a hub dataset (or local files in its schema) through an adapter."""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline.context import DATA_DIR
from pipeline.runner import main


def run(cfg: DictConfig) -> dict:
    from pipeline.data.prepare import prepare
    return prepare(cfg.data, DATA_DIR)


if __name__ == "__main__":
    main("prepare")
