"""Where the data comes from: `data.corpus` (the pretraining text), `data.sources.<split>` (one source for a chat
split) and `data.mixtures.<split>` (several weighted sources that make a split together).

`CorpusConfig` names the pretraining text the tokenizer stage shards; `SourceConfig` a hub dataset or local files
for one chat split; `MixturesConfig` (null by default) a list of weighted sources per split, each a `MixtureSource`
(`mixture_counts` gives each entry's rows). Mixtures sit beside `data.sources`, not in it, because Hydra cannot
merge a list over conf/'s mapping but merges one over a null, so `data.mixtures.sft=[...]` composes as written.
Files named by `data_files` are checked to exist by the stage that reads them (prepare, tokenizer), since later
stages no longer need them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.config.schema import Schema, describe

Count = Annotated[int, Field(ge=1)]
Source = Literal["generated", "hub", "files"]
Files = str | list[str] | dict[str, str | list[str]]

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

    def misfit(self, split: str, where: str) -> str | None:
        """Why this source cannot fill `split` (its adapter makes another kind of row), naming the field at
        `where`; None when it can."""
        made = ADAPTER_KINDS.get(self.adapter or "")
        kind = SPLIT_KINDS[split]
        if self.source == "generated" or made == kind:
            return None
        fits = ", ".join(a for a, k in ADAPTER_KINDS.items() if k == kind)
        return f"{where}.adapter {self.adapter!r} makes {made} rows but {split} holds {kind} rows: use one of {fits}"


class SourcesConfig(Schema):
    """`data.sources`: where each chat split comes from (pretraining text is `data.corpus`)."""

    sft: SourceConfig = SourceConfig()
    preference: SourceConfig = SourceConfig()
    rl_prompts: SourceConfig = SourceConfig()
    eval: SourceConfig = SourceConfig()
    eval_hard: SourceConfig = SourceConfig()

    @model_validator(mode="after")
    def _adapters_make_the_split_kind(self):
        for split in SPLIT_KINDS:
            if misfit := getattr(self, split).misfit(split, f"@.{split}"):
                raise ValueError(misfit)
        return self

    def external(self) -> dict[str, SourceConfig]:
        """The splits read from a hub dataset or local files, by name."""
        return {split: value for split in SPLIT_KINDS
                if (value := getattr(self, split)).source != "generated"}


class MixtureSource(SourceConfig):
    """One entry of a mixture (`data.mixtures.<split>[i]`): a source and its share of the split."""

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


def mixture_counts(entries: Mixture, size: int) -> list[int]:
    """Rows drawn from each entry: `rows` as given; the `weight` entries share `size` minus those rows by
    largest remainder (ties to the earlier entry), so the counts sum to it exactly. With only `rows` entries
    the split has their sum and `size` is unused."""
    fixed = sum(e.rows or 0 for e in entries)
    weights = {str(i): e.weight for i, e in enumerate(entries) if e.weight is not None}
    shares = allocate(size - fixed, weights) if weights else {}
    return [e.rows if e.rows is not None else shares[str(i)] for i, e in enumerate(entries)]


class MixturesConfig(Schema):
    """`data.mixtures`: per chat split, null (the split comes from `data.sources.<split>`) or a list of weighted
    sources whose rows are drawn and shuffled together (a mixture)."""

    where = "data.mixtures"

    sft: Mixture | None = None
    preference: Mixture | None = None
    rl_prompts: Mixture | None = None
    eval: Mixture | None = None
    eval_hard: Mixture | None = None

    @field_validator(*SPLIT_KINDS, mode="wrap")  # wrap, not plain: a plain one loses the field's serializer
    @classmethod
    def _weighted_sources(cls, value: Any, handler: Any, info: ValidationInfo) -> Mixture | None:
        """Each entry checked on its own, so errors name it (data.mixtures.<split>[i].<field>)."""
        split = info.field_name
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError(f"@ must be a list of sources, each with a weight or rows (a single source is "
                             f"data.sources.{split}), or null")
        entries = []
        for i, entry in enumerate(value):
            try:
                entries.append(MixtureSource.model_validate(entry))
            except ValidationError as err:  # one line per problem, each naming data.mixtures.<split>[i].<field>
                raise ValueError(describe(err, MixtureSource, f"@[{i}]")) from None
            if misfit := entries[-1].misfit(split, f"@[{i}]"):
                raise ValueError(misfit)
        if not entries:
            raise ValueError(f"@ is an empty list: give a list of sources each with a weight or rows, or null to take "
                             f"the split from data.sources.{split}")
        generated = [i for i, e in enumerate(entries) if e.source == "generated"]
        if len(generated) > 1:
            raise ValueError(f"@[{generated[1]}] is a second generated entry: the generator is one source, so give "
                             f"it one entry (its weight or rows sum those of @[{generated[0]}] and this one)")
        return entries

    def splits(self) -> dict[str, Mixture]:
        """The splits given a mixture, by name."""
        return {split: entries for split in SPLIT_KINDS if (entries := getattr(self, split)) is not None}
