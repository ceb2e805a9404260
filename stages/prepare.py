"""Stage `prepare`: generate the embedded data (pretraining text, SFT, preferences, RL prompts, eval)."""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline.context import DATA_DIR
from pipeline.runner import main


def run(cfg: DictConfig) -> dict:
    from pipeline.data.prepare import prepare
    return prepare(cfg.data, DATA_DIR)


if __name__ == "__main__":
    main("prepare")
