"""The evaluate stage: every language-model checkpoint on the same eval prompts, and the verdict on alignment.

`metrics/evaluate.json` maps checkpoint -> metric -> value (pipeline.evaluation.metrics measures them),
for every `gpt` checkpoint the chain writes (pretrain, sft, aligned, sft_control: `sft_control` is SFT
trained further for as many steps as alignment took). The `verdict` entry answers the questions alignment
is judged by: did it beat SFT and the same-compute control on exact match, did its KL to SFT stay under
`evaluate.kl_bound`, and did the reward model's score rise while ground-truth accuracy fell (reward
hacking)? Each checkpoint's row names the run that trained it (`run_id`, from its meta.json); the
verdict's `run_id` is this evaluation's, its `method` the one the aligned checkpoint records.

Every model (each checkpoint, the SFT reference for KL, the reward model) is scored on `trainer.accelerator`
in `trainer.precision` (pipeline.inference.placement); with trainer.devices x trainer.num_nodes > 1 one
process per device scores its share of the problems and rank 0's table is the one a single device gives.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.identity import run_id
from pipeline.data.splits import SPLIT_FILES, cot_trigger, load_split
from pipeline.data.tokenizer import ChatTokenizer, bounded_length, load_tokenizer
from pipeline.evaluation.metrics import PromptSet, evaluate_checkpoint, reward_hacking
from pipeline.inference.placement import launch
from pipeline.inference.prompting import FewShotPool, PromptTemplates
from pipeline.model.handoff import load_gpt, load_reward_model

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec

REFERENCE, ALIGNED, CONTROL = "sft", "aligned", "sft_control"  # the checkpoints the verdict compares
SHOWN = ("val_loss", "exact_match", "exact_match_cot", "exact_match_hard", "reward", "kl_to_sft")  # on the console

log = logging.getLogger(__name__)


def verdict(results: dict[str, dict[str, float]], method: str, kl_bound: float) -> dict:
    """How `aligned` compares with `sft` and `sft_control` (1/0 flags, so DVC can show and diff them)."""
    a, s, c = results[ALIGNED], results[REFERENCE], results[CONTROL]
    return {
        "method": method,
        "exact_match_vs_sft": round(a["exact_match"] - s["exact_match"], 6),
        "exact_match_vs_control": round(a["exact_match"] - c["exact_match"], 6),
        "beats_sft": int(a["exact_match"] > s["exact_match"]),
        "beats_control": int(a["exact_match"] > c["exact_match"]),
        "kl_to_sft": a["kl_to_sft"], "kl_bound": float(kl_bound),
        "kl_within_bound": int(a["kl_to_sft"] <= kl_bound),
        "reward_hacking": int(reward_hacking(a, s)),
    }


def templates(cfg: EvaluateConfig) -> PromptTemplates:
    """The configured templates, with the chain-of-thought trigger the prepared SFT data was written with
    (data/prepared/manifest.json), so evaluation asks the way training taught."""
    return PromptTemplates.from_config(cfg.prompts, cot_trigger())


def prompt_sets(cfg: EvaluateConfig, tok: ChatTokenizer, block_size: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """The eval and hard splits, each asked zero-shot, few-shot and step by step, as token prompts.
    Few-shot exemplars come from the SFT split."""
    asked = templates(cfg)
    eval_rows = load_split(paths.PREPARED, "eval")[: cfg.max_problems]
    hard_rows = load_split(paths.PREPARED, "eval_hard")[: cfg.max_problems]
    pool = FewShotPool(load_split(paths.PREPARED, "sft"), {r["key"] for r in eval_rows + hard_rows}, seed)
    room = block_size - cfg.max_new_tokens
    return (PromptSet.build(tok, asked, pool, eval_rows, room),
            PromptSet.build(tok, asked, pool, hard_rows, room))


def check_prompts(cfg: EvaluateConfig, tok: ChatTokenizer, block: int, rows: dict[str, list[dict]]) -> None:
    """Each eval prompt, as evaluate builds it, plus its answer budget must fit in the model's block_size
    (row i of a split is line i + 1 of its file: prepare writes no blank lines)."""
    asked = templates(cfg)
    asks = (("zero-shot", asked.question, "max_new_tokens", "zero_shot"),
            ("chain-of-thought", asked.worked, "cot_max_new_tokens", "cot"))
    for split, split_rows in rows.items():
        path = paths.PREPARED / SPLIT_FILES[split]
        for mode, ask, budget, template in asks:
            for i, row in enumerate(split_rows[: cfg.max_problems]):
                text, room = ask(row["prompt"]), getattr(cfg, budget)
                n, qualifier = bounded_length(tok, len(text.encode()), 3, block - room,  # a 10 MB prompt: not tokenized
                                              lambda text=text: len(tok.prompt(text)))
                if n + room > block:
                    raise ValueError(f"model.block_size ({block}) is too small for {path}:{i + 1}: its {mode} "
                                     f"prompt has {qualifier}{n} tokens and evaluate.{budget} ({room}) must fit "
                                     f"after it: raise model.block_size, lower evaluate.{budget} or shorten "
                                     f"evaluate.prompts.{template}")


def evaluate(cfg: Config, spec: StageSpec) -> dict:
    """Score every language-model checkpoint the stage reads; add the verdict. Under several processes every
    rank returns the whole table (only rank 0's is written: pipeline.harness.runner)."""
    e = cfg.evaluate
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    with launch(cfg.trainer) as (place, ranks):
        sft = place.place(load_gpt(REFERENCE, tok.sha256)[0])
        prompts, hard = prompt_sets(e, tok, sft.config.block_size, cfg.seed)
        reward_model = place.place(load_reward_model(sft.config, tok.sha256, spec.checkpoint("reward")))
        results: dict[str, dict] = {}
        metas: dict[str, dict] = {}
        for name in (n for n, kind in spec.reads.items() if kind == "gpt"):
            model, metas[name] = load_gpt(name, tok.sha256)
            with place.autocast():
                results[name] = evaluate_checkpoint(place.place(model), tok, prompts, hard, reward_model, sft, e,
                                                    cfg.seed, ranks, name)
            del model  # one checkpoint on the device at a time (besides the reference and the reward model)
            log.info("evaluate %s: %s", name, ", ".join(f"{k}={results[name][k]:.4g}" for k in SHOWN))
            log.debug("evaluate %s, every metric: %s", name, results[name])
            results[name]["run_id"] = metas[name].get("run_id")  # the run that trained it: its code and config
    results["verdict"] = {**verdict(results, str(metas[ALIGNED].get("method")), e.kl_bound), "run_id": run_id(cfg)}
    log.info("evaluate verdict: %s", ", ".join(f"{k}={v}" for k, v in results["verdict"].items()))
    return results
