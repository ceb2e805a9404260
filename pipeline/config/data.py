"""The `data` and `tokenizer` config groups: what the generator makes, where each split and the pretraining
text come from, and the BPE.

`DataConfig` is conf/data/*.yaml; `CorpusConfig` (`data.corpus`) names the pretraining text the tokenizer
stage shards; `SourceConfig` (`data.sources.<split>`) a hub dataset or local files for one chat split, or
`MixtureSource` one weighted entry of a list of them (a mixture; `mixture_counts` gives each entry's rows);
`TokenizerConfig` the BPE and the chat template's special tokens. Every check runs when the config is
loaded, before any stage touches the disk. Files named by `data_files` are checked to exist by the stage
that reads them (prepare, tokenizer), since later stages no longer need them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.config.schema import Schema, describe

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
Source = Literal["generated", "hub", "files"]
Files = str | list[str] | dict[str, str | list[str]]

# Share of each document kind in the pretraining corpus (fixed: `families` weights the chat splits).
PRETRAIN_MIX: dict[str, float] = {"fact": 0.3, "story": 0.2, "arith": 0.3, "string": 0.2}
# The chat template's special tokens, in the order tokenizer.special_tokens lists them.
ROLES: tuple[str, ...] = ("pad", "bos", "user", "assistant", "end")
DEFAULT_SPECIALS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>")
BYTES = 256  # a byte-level BPE starts from every byte
# Which kind of row each chat split holds (what its readers in datamodules/evaluate expect), and which
# kind each hub adapter (pipeline.data.hub.ADAPTERS) makes.
SPLIT_KINDS: dict[str, str] = {"sft": "chat", "preference": "preference", "rl_prompts": "problem",
                               "eval": "problem", "eval_hard": "problem"}
ADAPTER_KINDS: dict[str, str] = {"smoltalk": "chat", "ultrachat": "chat", "ultrafeedback": "preference",
                                 "hh_rlhf": "preference", "gsm8k": "problem"}
# file suffix -> the `datasets` builder that reads it: pretraining text may be plain text, chat splits not
CORPUS_FILES = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
SOURCE_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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


def file_builder(files: Files, where: str, builders: dict[str, str], must_exist: bool = True) -> str:
    """The `datasets` builder (json, text, parquet) for `files` (a path, a list, or {split: paths}), after
    checking all are of one kind and, with `must_exist`, exist; errors name the config field `where`."""
    entries = [files] if isinstance(files, str) else list(files.values() if isinstance(files, dict) else files)
    flat = [p for item in entries for p in ([item] if isinstance(item, str) else item)]
    kinds = {builders.get(Path(p).suffix.lower()) for p in flat}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"{where}.data_files {files!r}: every file must end in one of {', '.join(builders)}, "
                         "all of one kind")
    for p in flat if must_exist else ():
        if not any(c in p for c in "*?[") and not Path(p).is_file():
            raise FileNotFoundError(f"{where}.data_files names {p}, which does not exist: fix the path")
    return kinds.pop()


class CorpusConfig(Schema):
    """Where the pretraining text comes from and how it is sharded (`data.corpus`)."""

    where = "data.corpus"

    source: Source = "generated"
    """generated: data/prepared/pretrain*.jsonl from `prepare`; hub: an HF dataset; files: local files."""
    path: str | None = None
    """hub: dataset id, e.g. HuggingFaceFW/fineweb-edu."""
    name: str | None = None
    """hub: dataset config name, e.g. sample-10BT."""
    data_files: Files | None = None
    """files (or hub): a path, a list of paths, or {split: paths}; .json/.jsonl/.txt/.parquet."""
    split: str = "train"
    """hub/files: the split to train on."""
    val_split: str | None = None
    """hub/files: the validation split; null holds out the first `val_docs` documents of `split`."""
    val_docs: Count = 1000
    text_field: Annotated[str, Field(min_length=1)] = "text"
    """The column holding the text."""
    streaming: bool = False
    """Read lazily: nothing is materialised, so the corpus may exceed the disk cache."""
    max_docs: Count | None = None
    """Cap on training documents (null = all)."""
    shard_tokens: Count = 100_000_000
    """Tokens per shard file (100M = 200 MB as uint16)."""
    num_proc: Count | None = None
    """Tokenizer processes for a non-streaming corpus (null = in this process)."""
    batch_docs: Count = 1000
    """Documents per tokenization batch."""

    @model_validator(mode="after")
    def _source_is_complete(self):
        if self.source == "hub" and not self.path:
            raise ValueError("@.path is required for source hub: set it to a dataset id, e.g. "
                             "HuggingFaceFW/fineweb-edu")
        if self.source == "files":
            if not self.data_files:
                raise ValueError("@.data_files is required for source files: set it to a .jsonl, .json, .txt or "
                                 ".parquet path (or a list, or {split: paths})")
            file_builder(self.data_files, "@", CORPUS_FILES, must_exist=False)
        if self.streaming and self.num_proc:
            raise ValueError("@.num_proc needs streaming: false (a streamed corpus is tokenized lazily in one "
                             "process): set num_proc to null or streaming to false")
        return self


class SourceConfig(Schema):
    """Where one chat split comes from (`data.sources.<split>`)."""

    source: Source = "generated"
    """generated: the embedded generator (data.sizes); hub: an HF dataset; files: local files."""
    adapter: str | None = None
    """hub/files: how rows map onto the split's schema, one of pipeline.data.hub.ADAPTERS."""
    path: str | None = None
    """hub: dataset id, e.g. HuggingFaceTB/smoltalk."""
    name: str | None = None
    """hub: dataset config, e.g. all (smoltalk) or main (gsm8k)."""
    data_files: Files | None = None
    """files: a .jsonl/.json/.parquet path, a list, or {split: paths}, rows in the dataset's own schema."""
    split: str = "train"
    """hub/files: the dataset split to read."""
    max_rows: Count | None = None
    """Rows to keep (the first ones that map and fit; null = all)."""
    max_chars: Count | None = None
    """Skip rows with more characters than this (null = keep all), so they fit model.block_size."""

    @model_validator(mode="after")
    def _source_is_complete(self):
        if self.source == "generated":
            return self
        if self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"@.adapter {self.adapter!r} is unknown: use one of {', '.join(ADAPTER_KINDS)}")
        if self.source == "hub" and not self.path:
            raise ValueError("@.path is required for source hub: set it to a dataset id")
        if self.source == "files":
            if not self.data_files:
                raise ValueError("@.data_files is required for source files: set it to a .jsonl, .json or "
                                 ".parquet path (or a list, or {split: paths})")
            file_builder(self.data_files, "@", SOURCE_FILES, must_exist=False)
        return self


class MixtureSource(SourceConfig):
    """One entry of a mixture (`data.sources.<split>` as a list): a source and its share of the split."""

    weight: Annotated[float, Field(gt=0)] | None = None
    """A share of what `data.sizes.<split>` leaves after the `rows` entries (relative to the other weights)."""
    rows: Count | None = None
    """Exactly this many rows (instead of a weight)."""

    @model_validator(mode="after")
    def _weight_or_rows(self):
        if (self.weight is None) == (self.rows is None):
            raise ValueError("@ needs exactly one of weight (a share of data.sizes.<split>) or rows (a count): "
                             f"it has {'both' if self.weight is not None else 'neither'}")
        return self


Mixture = list[MixtureSource]
Sources = SourceConfig | Mixture


def mixture_counts(entries: Mixture, size: int) -> list[int]:
    """Rows drawn from each entry: `rows` as given; the `weight` entries share `size` minus those rows by
    largest remainder (ties to the earlier entry), so the counts sum to it exactly. With only `rows` entries
    the split has their sum and `size` is unused."""
    fixed = sum(e.rows or 0 for e in entries)
    weights = {str(i): e.weight for i, e in enumerate(entries) if e.weight is not None}
    shares = allocate(size - fixed, weights) if weights else {}
    return [e.rows if e.rows is not None else shares[str(i)] for i, e in enumerate(entries)]


class SourcesConfig(Schema):
    """`data.sources`: one entry per chat split (pretraining text is `data.corpus`): a source, or a list of
    weighted sources (a mixture)."""

    sft: Sources = SourceConfig()
    preference: Sources = SourceConfig()
    rl_prompts: Sources = SourceConfig()
    eval: Sources = SourceConfig()
    eval_hard: Sources = SourceConfig()

    @field_validator(*SPLIT_KINDS, mode="wrap")
    @classmethod
    def _one_or_mixture(cls, value: Any, handler: Any, info: ValidationInfo) -> Sources:
        if not isinstance(value, list):
            return SourceConfig.model_validate(value)  # errors keep their place (data.sources.<split>.<field>)
        entries = []
        for i, entry in enumerate(value):
            try:
                entries.append(MixtureSource.model_validate(entry))
            except ValidationError as err:  # one line per problem, each naming data.sources.<split>[i].<field>
                raise ValueError(describe(err, MixtureSource, f"@[{i}]")) from None
        if not entries:
            raise ValueError("@ is an empty list: give one source, or a list of sources each with a weight or rows")
        generated = [i for i, e in enumerate(entries) if e.source == "generated"]
        if len(generated) > 1:
            raise ValueError(f"@[{generated[1]}] is a second generated entry: the generator is one source, so give "
                             f"it one entry (its weight or rows sum those of @[{generated[0]}] and this one)")
        return entries

    @model_validator(mode="after")
    def _adapters_make_the_split_kind(self):
        for split, kind in SPLIT_KINDS.items():
            for where, cfg in self.entries(split):
                made = ADAPTER_KINDS.get(cfg.adapter or "")
                if cfg.source != "generated" and made != kind:
                    fits = [a for a, k in ADAPTER_KINDS.items() if k == kind]
                    raise ValueError(f"@.{split}{where}.adapter {cfg.adapter!r} makes {made} rows but {split} holds "
                                     f"{kind} rows: use one of {', '.join(fits)}")
        return self

    def entries(self, split: str) -> list[tuple[str, SourceConfig]]:
        """The split's sources with where each sits under `data.sources.<split>` ("" for a single one, "[i]")."""
        value: Sources = getattr(self, split)
        return [("", value)] if isinstance(value, SourceConfig) else [(f"[{i}]", e) for i, e in enumerate(value)]

    def mixtures(self) -> dict[str, Mixture]:
        """The splits given as a list of weighted sources, by name."""
        return {split: getattr(self, split) for split in SPLIT_KINDS if isinstance(getattr(self, split), list)}

    def external(self) -> dict[str, SourceConfig]:
        """The splits read from one hub dataset or local files (not a mixture), by name."""
        return {split: value for split in SPLIT_KINDS for value in [getattr(self, split)]
                if isinstance(value, SourceConfig) and value.source != "generated"}


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
    """The `data` config group (conf/data/*.yaml): the embedded generator, the pretraining text, the sources."""

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
        for split, entries in self.sources.mixtures().items():
            size, fixed = getattr(self.sizes, split), sum(e.rows or 0 for e in entries)
            if any(e.weight is not None for e in entries) and fixed >= size:
                raise ValueError(f"@.sources.{split}: its rows entries sum to {fixed}, leaving nothing of "
                                 f"@.sizes.{split} ({size}) for its weight entries: raise sizes.{split}, lower "
                                 "those rows, or give every entry rows")
        return self

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
