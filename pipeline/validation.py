"""Validation before work: a stage's config fields and inputs, checked before it does anything.

`pipeline.runner.run_stage` calls `validate_stage(name, cfg)` first, so a bad value or a damaged input
stops the stage within a second, with nothing written, and a ValueError (or FileNotFoundError) that
names the field (or the file and line) and the fix. Two groups, in this order:
- config fields: sizes, rates, shapes, names, templates and the room prompts leave in model.block_size;
- inputs that upstream stages wrote: the tokenizer, upstream checkpoints (meta.json and the weights'
  header only), token shards, prepared splits (every row parsed, schema checked) and their lengths.

Checks that live beside the code they guard are called from here, not repeated: the data config
(`pipeline.data.data_config`), data sources (`pipeline.data.hub`), align methods
(`pipeline.objectives.methods`), prompt templates (`pipeline.inference.prompting`), W&B artifact
logging (`pipeline.tracking`) and `model.init_from` (`pipeline.hf`). They are imported inside the
functions: importing this module must stay cheap (no torch, no lightning), since every way of
starting a stage imports it.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

TRAINING = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "sft_control": "sft"}  # stage -> its subtree
MODEL_STAGES = ("pretrain", "sft", "reward", "align", "sft_control", "export", "evaluate")
DEFAULT_SPECIALS = ("<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>")
RESUME_MODES = ("auto", "never", "force")
MIN_PROMPT = 4  # <|bos|> <|user|> one token <|assistant|>: the shortest prompt there is


def validate_stage(name: str, cfg: DictConfig) -> None:
    """Raise ValueError/FileNotFoundError naming the field or file if stage `name` cannot run on `cfg`."""
    _config(name, cfg)
    _inputs(name, cfg)


# ------------------------------------------------------------------ config fields

def _config(name: str, cfg: DictConfig) -> None:
    _logger(cfg)
    if name == "prepare":
        from pipeline.data.data_config import validate_config
        from pipeline.data.hub import sources_from_cfg
        validate_config(cfg.data)
        sources_from_cfg(cfg.data.get("sources"))
    if name == "tokenizer" or name in MODEL_STAGES:
        _special_tokens(cfg)
    if name == "tokenizer" and not _get(cfg, "model.init_from"):  # room for every byte and the special tokens
        _integer(cfg, "tokenizer.vocab_size", minimum=256 + len(cfg.tokenizer.special_tokens))
    if name in MODEL_STAGES:
        _model(cfg)
    if name in TRAINING:
        _training(cfg, TRAINING[name])
    if name == "reward":
        _integer(cfg, "reward.on_policy.prompts", minimum=0)
        _answer_budget(cfg, "reward.on_policy.max_new_tokens")
    if name == "evaluate":
        _evaluate(cfg)
    if name in ("align", "sft_control", "evaluate"):  # evaluate's verdict reads align.method and kl_bound
        from pipeline.objectives.methods import validate_align
        validate_align(cfg.align)
        _answer_budget(cfg, "align.max_new_tokens", "align.on_policy.max_new_tokens")
    if name in ("pretrain", "tokenizer"):
        from pipeline.hf import init_source
        init_source(_get(cfg, "model.init_from"))
    if name in TRAINING or name == "align":
        _trainer(cfg)
        _resume(cfg)


def _logger(cfg: DictConfig) -> None:
    """`logger.name` and, for W&B, `logger.artifacts` (pipeline.tracking)."""
    from pipeline.tracking import artifact_mode, logger_name
    if logger_name(cfg) == "wandb":
        artifact_mode(cfg)


def _resume(cfg: DictConfig) -> None:
    """`resume` (pipeline.resume): checkpoint cadences and the mode."""
    for field in ("resume.every_n_steps", "resume.every_n_iterations"):
        _integer(cfg, field, minimum=0, optional=True)
    mode = _get(cfg, "resume.mode")
    if mode is not None and mode not in RESUME_MODES:
        raise ValueError(f"resume.mode is {mode!r}: choose one of {', '.join(RESUME_MODES)}")


def _get(cfg: DictConfig, field: str):
    return OmegaConf.select(cfg, field, default=None)


def _integer(cfg: DictConfig, field: str, minimum: int = 1, optional: bool = False) -> None:
    value = _get(cfg, field)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} is {value!r}: it must be an integer >= {minimum}; set {field} to {minimum} or more")


def _positive(cfg: DictConfig, field: str, example: str) -> None:
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{field} is {value!r}: it must be a positive number; set it to e.g. {example}")


def _special_tokens(cfg: DictConfig) -> None:
    from pipeline.data.tokenizer import ROLES

    tokens = _get(cfg, "tokenizer.special_tokens")
    tokens = list(tokens) if tokens is not None else []
    if len(tokens) < len(ROLES):
        missing = ", ".join(f"{r} {DEFAULT_SPECIALS[i]!r}" for i, r in enumerate(ROLES) if i >= len(tokens))
        raise ValueError(f"tokenizer.special_tokens has {len(tokens)} entries but the chat template needs "
                         f"{len(ROLES)}, in order {', '.join(ROLES)}: add the missing {missing} "
                         f"(default: {list(DEFAULT_SPECIALS)})")
    if not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"tokenizer.special_tokens ({tokens}) must be distinct non-empty strings, "
                         f"e.g. {list(DEFAULT_SPECIALS)}")


def _model(cfg: DictConfig) -> None:
    for field in ("n_layer", "n_head", "n_embd", "block_size"):
        _integer(cfg, f"model.{field}")
    _integer(cfg, "model.vocab_size", optional=True)
    m = cfg.model
    if m.n_embd % m.n_head:
        fits = max(h for h in range(1, m.n_head + 1) if m.n_embd % h == 0)
        raise ValueError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}): set "
                         f"model.n_head to a divisor of n_embd (e.g. {fits}) or model.n_embd to a multiple of "
                         f"n_head (e.g. {-(-m.n_embd // m.n_head) * m.n_head})")
    dropout = m.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"model.dropout is {dropout!r}: it must be in [0, 1); set it to e.g. 0.0 or 0.1")


def _training(cfg: DictConfig, sub: str) -> None:
    for field in ("max_steps", "batch_size", "val_every", "val_batches"):
        _integer(cfg, f"{sub}.{field}")
    _integer(cfg, f"{sub}.accumulate", optional=True)
    _integer(cfg, f"{sub}.global_batch_tokens", optional=True)
    _positive(cfg, f"{sub}.optim.lr", "3e-4")


def _trainer(cfg: DictConfig) -> None:
    from pipeline.train import PRECISIONS, STRATEGIES  # imports lightning, which training stages load anyway

    precision = _get(cfg, "trainer.precision")
    if str(precision) not in PRECISIONS:
        raise ValueError(f"trainer.precision {precision!r} is unknown: choose one of {', '.join(PRECISIONS)} "
                         "(trainer=cpu|gpu, or -S trainer.precision=...)")
    strategy = _get(cfg, "strategy.name")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy.name {strategy!r} is unknown: choose one of {', '.join(STRATEGIES)} "
                         "(strategy=<name>, files in conf/strategy/)")


def _evaluate(cfg: DictConfig) -> None:
    from pipeline.inference.prompting import PromptTemplates

    for field in ("max_problems", "batch_size", "max_new_tokens", "cot_max_new_tokens"):
        _integer(cfg, f"evaluate.{field}")
    _integer(cfg, "evaluate.samples", minimum=0)
    PromptTemplates.from_cfg(cfg.evaluate.prompts, "")
    _answer_budget(cfg, "evaluate.max_new_tokens", "evaluate.cot_max_new_tokens")


def _answer_budget(cfg: DictConfig, *fields: str) -> None:
    """model.block_size must hold the shortest prompt plus each configured answer budget."""
    block = cfg.model.block_size
    for field in fields:
        budget = _get(cfg, field)
        if budget is None:
            continue
        _integer(cfg, field)
        if MIN_PROMPT + budget > block:
            raise ValueError(f"{field} ({budget}) leaves no room for a prompt in model.block_size ({block}): lower "
                             f"{field} below {block - MIN_PROMPT} or raise model.block_size")


# ------------------------------------------------------------------ inputs

def _inputs(name: str, cfg: DictConfig) -> None:
    upstream = _upstream(name, cfg)
    if not upstream and name != "pretrain":
        return
    from pipeline.checkpoint import check_checkpoint
    from pipeline.context import DATA_DIR, load_tokenizer
    from pipeline.data.prepare import SPLIT_FILES, load_split

    tok = load_tokenizer(cfg)
    for ckpt, kind in upstream.items():
        check_checkpoint(ckpt, kind, tok.sha256)
    if name == "pretrain":
        _token_shards(tok.sha256)
    rows = {split: load_split(DATA_DIR, split) for split in _splits(name, cfg)}
    if name in ("sft", "sft_control"):
        _sft_lengths(rows["sft"], tok, cfg.model.block_size, DATA_DIR / SPLIT_FILES["sft"])
    if name == "evaluate":
        _eval_prompts(cfg, tok, {DATA_DIR / SPLIT_FILES[s]: rows[s] for s in ("eval", "eval_hard")}, DATA_DIR)


def _upstream(name: str, cfg: DictConfig) -> dict[str, str]:
    """The checkpoints stage `name` loads: {checkpoint: kind}."""
    ppo = {"reward": "reward"} if _get(cfg, "align.method") == "ppo" else {}  # PPO scores with the reward model
    return {"sft": {"pretrain": "gpt"}, "reward": {"sft": "gpt"}, "sft_control": {"sft": "gpt"},
            "align": {"sft": "gpt", **ppo}, "export": {"aligned": "gpt"},
            "evaluate": {"pretrain": "gpt", "sft": "gpt", "sft_control": "gpt", "aligned": "gpt", "reward": "reward"},
            }.get(name, {})


def _splits(name: str, cfg: DictConfig) -> tuple[str, ...]:
    """The prepared splits stage `name` reads."""
    if name == "align" and _get(cfg, "align.method") != "dpo":
        return ("rl_prompts",)
    if name in ("reward", "align"):  # preference pairs, plus RL prompts to sample on-policy pairs from
        return ("preference", "rl_prompts") if (_get(cfg, f"{name}.on_policy.prompts") or 0) > 0 else ("preference",)
    return {"sft": ("sft",), "sft_control": ("sft",), "evaluate": ("eval", "eval_hard", "sft")}.get(name, ())


def _token_shards(sha256: str) -> None:
    """Pretraining's token shards must come from the workspace's tokenizer."""
    import json

    from pipeline.data.shards import TOKENS_DIR

    for split in ("pretrain", "pretrain_val"):
        path = TOKENS_DIR / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the tokenizer stage first (dvc repro tokenizer)")
        try:
            written_by = json.loads(path.read_text()).get("tokenizer_sha256")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{path} is damaged ({err}): rerun `dvc repro tokenizer`") from None
        if written_by != sha256:
            raise ValueError(f"{path} was written by another tokenizer than the workspace's: rerun "
                             "`dvc repro tokenizer`")


def _sft_lengths(rows: list[dict], tok, block: int, path: Path) -> None:
    """Every SFT conversation must fit in model.block_size (row i is line i + 1: prepare writes no blank lines).
    A byte-level token spans at least one byte and a message adds at most two special tokens, so only
    conversations whose bytes could exceed `block` are tokenized."""
    for i, row in enumerate(rows):
        try:
            if 1 + sum(len(m["content"].encode()) + 2 for m in row["messages"]) <= block:
                continue
            n = len(tok.chat(row["messages"])[0])
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{i + 1}: field 'messages' must be a list of {{role, content}} messages: "
                             "rerun `dvc repro prepare`") from None
        if n > block:
            raise ValueError(f"{path}:{i + 1}: the conversation has {n} tokens, more than model.block_size "
                             f"({block}): raise model.block_size, or drop such rows (data.sources.sft.max_chars "
                             "for hub data) and rerun `dvc repro prepare`")


def _eval_prompts(cfg: DictConfig, tok, rows: dict[Path, list[dict]], data_dir: Path) -> None:
    """Each eval prompt, as evaluate builds it, plus its answer budget must fit in model.block_size."""
    from pipeline.data.prepare import MANIFEST_FILE
    from pipeline.inference.prompting import PromptTemplates
    from pipeline.io import read_json

    e, block = cfg.evaluate, cfg.model.block_size
    templates = PromptTemplates.from_cfg(e.prompts, read_json(data_dir / MANIFEST_FILE)["config"]["cot"]["trigger"])
    asks = (("zero-shot", templates.question, "max_new_tokens", "zero_shot"),
            ("chain-of-thought", templates.worked, "cot_max_new_tokens", "cot"))
    for path, split_rows in rows.items():
        for mode, ask, budget, template in asks:
            for i, row in enumerate(split_rows[: e.max_problems]):
                n = len(tok.prompt(ask(row["prompt"])))
                if n + e[budget] > block:
                    raise ValueError(f"model.block_size ({block}) is too small for {path}:{i + 1}: its {mode} "
                                     f"prompt has {n} tokens and evaluate.{budget} ({e[budget]}) must fit after "
                                     f"it: raise model.block_size, lower evaluate.{budget} or shorten "
                                     f"evaluate.prompts.{template}")
