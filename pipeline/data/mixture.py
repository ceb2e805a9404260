"""Mixture splits: one chat split drawn from several weighted sources (`data.mixtures.<split>`).

Holds `generator_sizes` (what the generator makes of each mixture split), `draw_mixtures` (each mixture
split's rows and what each entry gave) and `mixture_metrics` (per-entry counts for metrics/prepare.json);
`pipeline.data.prepare` calls them. The entries are `pipeline.config.sources.MixtureSource`, checked when the
config was loaded; `mixture_counts` there gives each entry's rows.

Design choices:
- Hand-written: `datasets.interleave_datasets` samples by probability, so its counts only approach the
  weights and its rows do not say which source they came from; no library draws a seeded weighted mixture
  with exact largest-remainder counts and per-source provenance of this pipeline's rows, and the draw is a
  few lines over `random.Random`.
- Each entry gives the rows `mixture_counts` allots it: the generator makes just that many (prepare runs it
  with that size), a hub or file source yields its usable rows (the first `max_rows`) of which that many are
  sampled without replacement; the rows are then shuffled together. Both draws are seeded by (`seed`, split,
  entry), an eval split's by the eval seed instead, so every training seed is scored on the same questions.
- Each entry's config and counts (read, skipped, too long, drawn) go into the manifest (`mixtures`) and
  flat counts into the metrics (`<split>_source<i>_rows`), so a run shows the mix it trained on.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from pipeline.config.data import DataConfig, SizesConfig
from pipeline.config.sources import Mixture, SourceConfig, mixture_counts
from pipeline.data.hub import describe
from pipeline.data.splits import EVAL_SPLITS

# (split, config field, source) -> a hub or file source's usable rows and counts of what it dropped
Reader = Callable[[str, str, SourceConfig], tuple[list[dict], dict[str, int]]]


def generator_sizes(config: DataConfig) -> tuple[SizesConfig, frozenset[str]]:
    """`data.sizes` with each mixture split's size set to its generated entry's count, and the mixture splits
    without a generated entry (the generator makes none of them)."""
    made = {split: next((n for e, n in zip(entries, mixture_counts(entries, getattr(config.sizes, split)))
                         if e.source == "generated"), 0) for split, entries in config.mixtures.splits().items()}
    return (config.sizes.model_copy(update={split: n for split, n in made.items() if n}),
            frozenset(split for split, n in made.items() if not n))


def draw_mixtures(config: DataConfig, generated: dict[str, list[dict]], read: Reader,
                  eval_seed: str) -> dict[str, list[dict]]:
    """Put each mixture split's rows in `generated` (which holds the generator's share of it) and return, per
    mixture split, each entry's config and counts. An eval split draws with `eval_seed`, not `data.seed`."""
    report = {}
    for split, entries in config.mixtures.splits().items():
        seed = eval_seed if split in EVAL_SPLITS else config.seed
        generated[split], report[split] = _draw(split, entries, getattr(config.sizes, split), seed,
                                                generated.get(split, []), read)
    return report


def _draw(split: str, entries: Mixture, size: int, seed: int | str, made: list[dict],
          read: Reader) -> tuple[list[dict], list[dict]]:
    """A mixture split's rows (of `size`, split among `entries` by `mixture_counts`), shuffled together, and per
    entry its config and counts. `made` is what the generator made for the split."""
    rows: list[dict] = []
    report: list[dict] = []
    for i, (entry, n) in enumerate(zip(entries, mixture_counts(entries, size))):
        counts: dict[str, int] = {}
        part = made
        if entry.source != "generated":
            where = f"data.mixtures.{split}[{i}]"
            pool, counts = read(split, where, entry)
            if len(pool) < n:
                raise ValueError(f"{where} ({entry.adapter}: {describe(entry)}) has {len(pool)} usable rows, fewer "
                                 f"than the {n} the mixture draws from it: lower its weight or rows, or raise its "
                                 "max_rows")
            part = random.Random(f"{split}[{i}]:{seed}").sample(pool, n)
        rows += part
        report.append({**entry.model_dump(), **counts, "drawn": len(part)})
    random.Random(f"{split}:mixture:{seed}").shuffle(rows)
    return rows, report


def mixture_metrics(mixed: dict[str, list[dict]]) -> dict[str, int]:
    """Per mixture split and entry i: `<split>_source<i>_rows` drawn, and for a hub or file entry the rows its
    adapter skipped and those over `max_chars`."""
    return {f"{split}_source{i}_{what}": entry[key] for split, entries in mixed.items()
            for i, entry in enumerate(entries)
            for what, key in (("rows", "drawn"), ("skipped", "skipped"), ("too_long", "too_long")) if key in entry}
