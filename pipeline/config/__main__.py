"""Regenerate params.yaml from conf/ (what `dvc exp run` does), e.g. after editing a conf/ default.

    python -m pipeline.config [hydra overrides...]      # or: make params
"""
from __future__ import annotations

import sys

from pipeline.config.load import write_params


def main(argv: list[str] | None = None) -> None:
    print(f"wrote {write_params(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
