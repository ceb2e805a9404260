"""The `data` and `tokenizer` config groups: what the generator makes, where each split and the pretraining
text come from, and the BPE.

`DataConfig` is conf/data/*.yaml: the generator's settings, and where each split comes from
(`data.corpus`, `data.sources`, `data.mixtures`: pipeline.config.sources); `TokenizerConfig` the BPE and the
chat template's special tokens. Every check runs when the config is loaded, before any stage touches the disk.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema import Schema
from pipeline.config.sources import SPLIT_KINDS, CorpusConfig, MixturesConfig, SourceConfig, SourcesConfig, allocate

Count = Annotated[int, Field(ge=1)]

# The task families the generator knows and the corruptions each admits (pipeline.data.tasks implements them).
FAMILIES: tuple[str, ...] = ("add", "sub", "reverse", "sort", "count", "fact")

CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "add": ("off_by_one", "off_by_ten", "carry_error", "swapped_digits", "wrong_operator", "preamble", "rambling",
            "missing_end"),
    "sub": ("off_by_one", "off_by_ten", "carry_error", "swapped_digits", "wrong_operator", "preamble", "rambling",
            "missing_end"),
    "count": ("off_by_one", "preamble", "rambling", "missing_end"),
    "reverse": ("swapped_letters", "copied_input", "preamble", "rambling", "missing_end"),
    "sort": ("swapped_letters", "copied_input", "preamble", "rambling", "missing_end"),
    "fact": ("wrong_entity", "preamble", "rambling", "missing_end"),
}
# what a demonstration can get wrong: any corruption that still ends its reply properly
DEMO_ERROR_KINDS: tuple[str, ...] = tuple(sorted({k for kinds in CORRUPTIONS.values() for k in kinds}
                                                 - {"missing_end"}))

Fraction = Annotated[float, Field(ge=0, le=1)]

# Share of each document kind in the pretraining corpus (fixed: `families` weights the chat splits).
PRETRAIN_MIX: dict[str, float] = {"fact": 0.3, "story": 0.2, "arith": 0.3, "string": 0.2}
# The chat template's special tokens, in the order tokenizer.special_tokens lists them.
ROLES: tuple[str, ...] = ("pad", "bos", "user", "assistant", "end")
DEFAULT_SPECIALS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>")
BYTES = 256  # a byte-level BPE starts from every byte
class WorldConfig(Schema):
    n_entities: Annotated[int, Field(ge=2)] = 24
    """Invented entities whose facts the pretraining text states."""
    seed: int = 7


class SizesConfig(Schema):
    """Rows (documents) per split."""

    pretrain_docs: Count = 12000
    pretrain_val_docs: Count = 400
    sft: Count = 16000
    preference: Count = 20000
    rl_prompts: Count = 2000
    eval: Count = 400
    eval_hard: Count = 200


class StringLenConfig(Schema):
    min: Annotated[int, Field(ge=2)] = 3
    max: Annotated[int, Field(ge=2)] = 6

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"@.min ({self.min}) must not exceed @.max ({self.max}): lower min or raise max")
        return self


class DemoErrorsConfig(Schema):
    """Imperfect demonstrations: this share of SFT replies carries a plausible error of one of `kinds`."""

    rate: Annotated[float, Field(ge=0, lt=0.5)] = 0.45
    """In [0, 0.5): a majority of wrong demonstrations would teach the wrong answer."""
    kinds: list[str] = ["preamble"]

    @field_validator("kinds")
    @classmethod
    def _known(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(DEMO_ERROR_KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}: use only {list(DEMO_ERROR_KINDS)}")
        return kinds


class CotConfig(Schema):
    """Chain of thought: this share of SFT problems asks for steps with `trigger` and shows a worked solution."""

    fraction: Fraction = 0.2
    trigger: str = "Think step by step."

    @field_validator("trigger")
    @classmethod
    def _phrase(cls, trigger: str) -> str:
        if not trigger.strip():
            raise ValueError("it must be a non-empty phrase, e.g. 'Think step by step.'")
        return trigger.strip()


class MultiTurnConfig(Schema):
    """This share of the direct SFT problems comes after 1 to max_turns - 1 earlier exchanges."""

    fraction: Fraction = 0.2
    max_turns: Annotated[int, Field(ge=2)] = 3


class DataConfig(Schema):
    """The `data` config group (conf/data/*.yaml): the embedded generator, the pretraining text, the sources and
    mixtures of the chat splits."""

    where = "data"

    source: str = "embedded"
    """A label of the data recipe (embedded, tinystories, hub), for people; nothing reads it."""
    seed: int = 1234
    """Which examples are drawn; never which problems are held out for eval."""
    digits: Count = 2
    """Max operand digits for training and eval arithmetic."""
    hard_digits: Count = 3
    """Operand digits of the harder held-out split (> digits, never trained on)."""
    eval_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    """Share of the problem-key space held out for eval (by hash of the key)."""
    families: dict[str, Annotated[float, Field(ge=0)]] = {"add": 3, "sub": 2, "reverse": 1, "sort": 1, "count": 1,
                                                          "fact": 1}
    """Sampling weights of the task families."""
    world: WorldConfig = WorldConfig()
    sizes: SizesConfig = SizesConfig()
    string_len: StringLenConfig = StringLenConfig()
    demo_errors: DemoErrorsConfig = DemoErrorsConfig()
    cot: CotConfig = CotConfig()
    multi_turn: MultiTurnConfig = MultiTurnConfig()
    corpus: CorpusConfig = CorpusConfig()
    sources: SourcesConfig = SourcesConfig()
    mixtures: MixturesConfig = MixturesConfig()

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {unknown}: use only {list(FAMILIES)}")
        if not any(w > 0 for w in families.values()):
            raise ValueError("the weights are all zero: give at least one family a positive weight")
        return families

    @model_validator(mode="after")
    def _consistent(self):
        if self.hard_digits <= self.digits:
            raise ValueError(f"@.hard_digits ({self.hard_digits}) must be greater than @.digits ({self.digits}): "
                             "raise hard_digits")
        fact_docs = allocate(self.sizes.pretrain_docs, PRETRAIN_MIX)["fact"]
        if fact_docs < self.world.n_entities:
            raise ValueError(f"@.sizes.pretrain_docs ({self.sizes.pretrain_docs}) gives {fact_docs} fact documents, "
                             f"fewer than @.world.n_entities ({self.world.n_entities}): raise pretrain_docs or "
                             "lower n_entities")
        for split, entries in self.mixtures.splits().items():
            single = getattr(self.sources, split)
            if single.source != "generated":
                raise ValueError(f"@.mixtures.{split} and @.sources.{split} (source {single.source}) both say where "
                                 f"{split} comes from: a mixture's entries name their own sources, so move that one "
                                 f"into the mixture as an entry and set @.sources.{split}.source back to generated, "
                                 f"or set @.mixtures.{split} to null")
            size, fixed = getattr(self.sizes, split), sum(e.rows or 0 for e in entries)
            if any(e.weight is not None for e in entries) and fixed >= size:
                raise ValueError(f"@.mixtures.{split}: its rows entries sum to {fixed}, leaving nothing of "
                                 f"@.sizes.{split} ({size}) for its weight entries: raise sizes.{split}, lower "
                                 "those rows, or give every entry rows")
        return self

    def entries(self, split: str | None = None) -> list[tuple[str, SourceConfig]]:
        """Every source of `split` (of every chat split when None) with the config field it sits at: a mixture's
        entries (`data.mixtures.<split>[i]`), else the split's one source (`data.sources.<split>`)."""
        found: list[tuple[str, SourceConfig]] = []
        for name in SPLIT_KINDS if split is None else (split,):
            mixture = getattr(self.mixtures, name)
            found += ([(f"data.sources.{name}", getattr(self.sources, name))] if mixture is None
                      else [(f"data.mixtures.{name}[{i}]", e) for i, e in enumerate(mixture)])
        return found

    def weights(self) -> dict[str, float]:
        """Every family's weight, in FAMILIES order (0 for one the config leaves out)."""
        return {f: float(self.families.get(f, 0)) for f in FAMILIES}

    def generator(self) -> dict[str, Any]:
        """What the generator is configured with, as the manifest records it."""
        return {"seed": self.seed, "digits": self.digits, "hard_digits": self.hard_digits,
                "eval_fraction": float(self.eval_fraction), "families": self.weights(),
                "world": self.world.model_dump(), "sizes": self.sizes.model_dump(),
                "string_len": self.string_len.model_dump(),
                "demo_errors": {"rate": float(self.demo_errors.rate), "kinds": list(self.demo_errors.kinds)},
                "cot": {"fraction": float(self.cot.fraction), "trigger": self.cot.trigger},
                "multi_turn": {"fraction": float(self.multi_turn.fraction), "max_turns": self.multi_turn.max_turns}}


class TokenizerConfig(Schema):
    """The `tokenizer` config group: the byte-level BPE and the chat template's special tokens."""

    where = "tokenizer"

    vocab_size: Count = 512
    """BPE vocabulary including the special tokens (at least 256 bytes + the special tokens)."""
    special_tokens: list[str] = list(DEFAULT_SPECIALS)
    """The chat template's tokens, in the order pad, bos, user, assistant, end."""
    train_docs: Count = 50000
    """Documents of the pretraining corpus the BPE is trained on (the first ones)."""

    @field_validator("special_tokens")
    @classmethod
    def _template_tokens(cls, tokens: list[str]) -> list[str]:
        if len(tokens) < len(ROLES):
            missing = ", ".join(f"{r} {DEFAULT_SPECIALS[i]!r}" for i, r in enumerate(ROLES) if i >= len(tokens))
            raise ValueError(f"@ has {len(tokens)} entries but the chat template needs "
                             f"{len(ROLES)}, in order {', '.join(ROLES)}: add the missing {missing} "
                             f"(default: {list(DEFAULT_SPECIALS)})")
        if not all(tokens) or len(set(tokens)) != len(tokens):
            raise ValueError(f"@ ({tokens}) must be distinct non-empty strings, "
                             f"e.g. {list(DEFAULT_SPECIALS)}")
        return tokens

    def min_vocab(self) -> int:
        """The smallest vocabulary a trained BPE can have: every byte plus the special tokens."""
        return BYTES + len(self.special_tokens)
