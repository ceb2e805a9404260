"""Stage `export`: the aligned checkpoint as a transformers directory (`artifacts/export`): GPT-2, or the Llama-family
architecture it was imported as (pipeline/interop/hf.py).

`AutoModelForCausalLM.from_pretrained("artifacts/export")` and `AutoTokenizer.from_pretrained(...)` load it
offline. Writing it needs no transformers (pipeline/interop/hf.py); any checkpoint can be exported by hand
with `gpt-pipeline export --stage NAME --out DIR`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Artifact, Out, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config

SPEC = StageSpec(
    name="export",
    desc="The aligned model as a transformers directory (GPT-2 or Llama family; writing it needs no transformers)",
    params=("tokenizer.special_tokens",),
    inputs=(paths.TOKENIZER_DIR,),
    reads={"aligned": "gpt"},
    outs=(Out(str(paths.EXPORT_DIR)),),
    artifacts=(Artifact("export", str(paths.EXPORT_DIR), "model", "The aligned model as a transformers "
                        "directory (AutoModelForCausalLM.from_pretrained)",
                        ("gpt", "chat", "aligned", "transformers")),),
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.harness.validation import check_inputs
    check_inputs(cfg, spec)


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.interop.hf import export_checkpoint
    from pipeline.io import read_json
    name = spec.checkpoint("gpt")
    out = export_checkpoint(name, paths.EXPORT_DIR, cfg.tokenizer.special_tokens)
    config = read_json(out / "config.json")
    return {"checkpoint": name, "architecture": config["architectures"][0], "vocab_size": config["vocab_size"],
            "n_positions": config.get("n_positions", config.get("max_position_embeddings")),
            "model_mb": round((out / "model.safetensors").stat().st_size / 2**20, 3)}


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
