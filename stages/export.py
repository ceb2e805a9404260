"""Stage `export`: the aligned checkpoint as a transformers GPT-2 directory (`artifacts/export`).

`AutoModelForCausalLM.from_pretrained("artifacts/export")` and `AutoTokenizer.from_pretrained(...)`
load it offline. Writing it needs no transformers (pipeline/hf.py); any checkpoint can be exported
by hand with `gpt-pipeline export --stage NAME --out DIR`.
"""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline.checkpoint import ARTIFACTS
from pipeline.hf import export_checkpoint
from pipeline.io import read_json
from pipeline.runner import main

EXPORT_DIR = ARTIFACTS / "export"


def run(cfg: DictConfig) -> dict:
    out = export_checkpoint("aligned", EXPORT_DIR, list(cfg.tokenizer.special_tokens))
    config = read_json(out / "config.json")
    return {"checkpoint": "aligned", "vocab_size": config["vocab_size"], "n_positions": config["n_positions"],
            "model_mb": round((out / "model.safetensors").stat().st_size / 2**20, 3)}


if __name__ == "__main__":
    main("export")
