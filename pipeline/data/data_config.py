"""The data config: `DataConfig` (the typed, validated form of `conf/data/*.yaml`) and `validate_config`.

Validation happens before anything touches the disk, and each error names the field and the fix, so a
bad `-S data.x=...` fails in a second with nothing left behind. `data.sources` (hub and file splits) is
validated by `pipeline.data.hub`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.data.tasks import CORRUPTIONS, FAMILIES

SIZE_FIELDS: tuple[str, ...] = ("pretrain_docs", "pretrain_val_docs", "sft", "preference", "rl_prompts", "eval", "eval_hard")
# Share of each document kind in the pretraining corpus (fixed: `families` weights the chat splits).
PRETRAIN_MIX: dict[str, float] = {"fact": 0.3, "story": 0.2, "arith": 0.3, "string": 0.2}


@dataclass(frozen=True)
class DataConfig:
    """Validated data config; field names mirror conf/data/default.yaml."""

    seed: int
    digits: int
    hard_digits: int
    eval_fraction: float
    families: dict[str, float]
    world: dict[str, int]
    sizes: dict[str, int]
    string_len: dict[str, int]
    demo_errors: dict[str, Any]
    cot: dict[str, Any]
    multi_turn: dict[str, Any]


def _get(node: Any, name: str, path: str) -> Any:
    try:
        value = node[name] if hasattr(node, "keys") else getattr(node, name)
    except Exception:  # KeyError, AttributeError, or OmegaConf's MissingMandatoryValue for `???`
        raise ValueError(f"{path}.{name} is missing: add it (see conf/data/default.yaml)") from None
    if value is None:
        raise ValueError(f"{path}.{name} is null: set it (see conf/data/default.yaml)")
    return value


def _mapping(node: Any, path: str) -> dict[str, Any]:
    if hasattr(node, "keys"):
        return {str(k): node[k] for k in node.keys()}
    if hasattr(node, "__dict__"):
        return dict(vars(node))
    raise ValueError(f"{path} must be a mapping, got {type(node).__name__}")


def _int(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{path} ({value}) must be at least {minimum}: raise it")
    return value


def validate_config(cfg: Any) -> DataConfig:
    """Check `cfg` (DictConfig or any attribute/item mapping); raise ValueError naming the field."""
    seed = _get(cfg, "seed", "data")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"data.seed must be an integer, got {seed!r}")
    digits = _int(_get(cfg, "digits", "data"), "data.digits", 1)
    hard = _int(_get(cfg, "hard_digits", "data"), "data.hard_digits", 1)
    if hard <= digits:
        raise ValueError(f"data.hard_digits ({hard}) must be greater than data.digits ({digits}): raise hard_digits")
    frac = _get(cfg, "eval_fraction", "data")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 0.5:
        raise ValueError(f"data.eval_fraction ({frac!r}) must be in (0, 0.5]: e.g. 0.1")

    families = _mapping(_get(cfg, "families", "data"), "data.families")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"data.families has unknown families {unknown}: use only {list(FAMILIES)}")
    for name, weight in families.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"data.families.{name} ({weight!r}) must be a non-negative number")
    if not any(w > 0 for w in families.values()):
        raise ValueError("data.families weights are all zero: give at least one family a positive weight")

    world_node = _get(cfg, "world", "data")
    world = {
        "n_entities": _int(_get(world_node, "n_entities", "data.world"), "data.world.n_entities", 2),
        "seed": _get(world_node, "seed", "data.world"),
    }
    if isinstance(world["seed"], bool) or not isinstance(world["seed"], int):
        raise ValueError(f"data.world.seed must be an integer, got {world['seed']!r}")
    sizes_node = _mapping(_get(cfg, "sizes", "data"), "data.sizes")
    extra = sorted(set(sizes_node) - set(SIZE_FIELDS))
    if extra:
        raise ValueError(f"data.sizes has unknown entries {extra}: use only {list(SIZE_FIELDS)}")
    sizes = {name: _int(_get(sizes_node, name, "data.sizes"), f"data.sizes.{name}", 1) for name in SIZE_FIELDS}
    fact_docs = allocate(sizes["pretrain_docs"], PRETRAIN_MIX)["fact"]
    if fact_docs < world["n_entities"]:
        raise ValueError(
            f"data.sizes.pretrain_docs ({sizes['pretrain_docs']}) gives {fact_docs} fact documents, fewer than "
            f"data.world.n_entities ({world['n_entities']}): raise pretrain_docs or lower n_entities"
        )

    sl_node = _get(cfg, "string_len", "data")
    lo = _int(_get(sl_node, "min", "data.string_len"), "data.string_len.min", 2)
    hi = _int(_get(sl_node, "max", "data.string_len"), "data.string_len.max", 2)
    if lo > hi:
        raise ValueError(f"data.string_len.min ({lo}) must not exceed data.string_len.max ({hi}): lower min or raise max")
    demo_errors = _demo_errors(_get(cfg, "demo_errors", "data"))
    return DataConfig(
        seed=seed, digits=digits, hard_digits=hard, eval_fraction=float(frac),
        families={f: float(families.get(f, 0)) for f in FAMILIES},
        world=world, sizes=sizes, string_len={"min": lo, "max": hi}, demo_errors=demo_errors,
        cot=_cot(_get(cfg, "cot", "data")), multi_turn=_multi_turn(_get(cfg, "multi_turn", "data")),
    )


def _multi_turn(node: Any) -> dict[str, Any]:
    fraction = _get(node, "fraction", "data.multi_turn")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"data.multi_turn.fraction ({fraction!r}) must be in [0, 1], e.g. 0.2")
    return {"fraction": float(fraction), "max_turns": _int(_get(node, "max_turns", "data.multi_turn"),
                                                          "data.multi_turn.max_turns", 2)}


def _cot(node: Any) -> dict[str, Any]:
    fraction = _get(node, "fraction", "data.cot")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"data.cot.fraction ({fraction!r}) must be in [0, 1], e.g. 0.2")
    trigger = _get(node, "trigger", "data.cot")
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError(f"data.cot.trigger ({trigger!r}) must be a non-empty phrase, e.g. 'Think step by step.'")
    return {"fraction": float(fraction), "trigger": trigger.strip()}


# what a demonstration can get wrong: any corruption that still ends its reply properly
_DEMO_KINDS = sorted({k for kinds in CORRUPTIONS.values() for k in kinds} - {"missing_end"})


def _demo_errors(node: Any) -> dict[str, Any]:
    rate = _get(node, "rate", "data.demo_errors")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 0.5:
        raise ValueError(f"data.demo_errors.rate ({rate!r}) must be in [0, 0.5): a majority of wrong "
                         "demonstrations would teach the wrong answer, e.g. 0.3")
    kinds = list(_get(node, "kinds", "data.demo_errors"))
    unknown = sorted(set(kinds) - set(_DEMO_KINDS))
    if unknown:
        raise ValueError(f"data.demo_errors.kinds has unknown kinds {unknown}: use only {_DEMO_KINDS}")
    return {"rate": float(rate), "kinds": kinds}


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainder; deterministic)."""
    positive = {k: w for k, w in weights.items() if w > 0}
    norm = sum(positive.values())
    exact = {k: total * w / norm for k, w in positive.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(positive, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return {k: counts.get(k, 0) for k in weights}
