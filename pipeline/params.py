"""Regenerate params.yaml from conf/ (what `dvc exp run` does), e.g. after editing a conf/ default.

    python -m pipeline.params [hydra overrides...]
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import PARAMS_FILE, compose


def main(argv: list[str] | None = None) -> None:
    cfg = compose(argv if argv is not None else sys.argv[1:])
    Path(PARAMS_FILE).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    print(f"wrote {PARAMS_FILE}")


if __name__ == "__main__":
    main()
