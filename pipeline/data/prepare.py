"""The prepare stage: validate the data config, generate every split, write them atomically.

Holds `prepare` (generation + writing + manifest + metrics); `check_sources` (the local files a config
names exist, before any work) is `pipeline.data.hub`'s. The config is `pipeline.config.data.DataConfig`,
checked when it was loaded; the files are read back by `pipeline.data.splits`.

Design choices:
- Each split has its own `random.Random` seeded from (`seed`, split name), so changing one
  split's size never reshuffles another. Eval splits use a seed that does not depend on
  `seed` at all: every training seed is scored on the same questions.
- Rows are sampled by key from `tasks.draw_key`, which rejects the wrong side of the eval
  partition; an audit re-checks every key (including those behind pretraining prose)
  before writing and refuses to write leaky data (`leaked_keys` is reported as 0).
- Family counts are allocated by largest remainder and rows shuffled, so per-family counts
  are exact and reproducible; eval draws unique keys and, when a family's eval pool is
  smaller than its share, hands the rest to other families.
- A chat split whose `data.sources` entry is not `generated` is read from the Hub or local files
  through an adapter (`pipeline.data.hub`) instead, and one with a `data.mixtures` list is drawn from
  several weighted sources (`pipeline.data.mixture`). The audit checks each row by where it came from:
  generated rows against the partition, rows from the hub or files for keys, and prompts, shared
  between training and eval. With neither, the files and manifest are exactly those of a config
  without `data.sources` or `data.mixtures`.
- Files are written with HF `datasets` (the project's data layer) into a sibling temp dir
  that replaces `out_dir` only when complete (`pipeline.io.atomic_dir`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config.data import CORRUPTIONS, PRETRAIN_MIX, DataConfig
from pipeline.config.sources import SourceConfig, allocate
from pipeline.data.hub import check_sources, describe, load_rows
from pipeline.data.mixture import draw_mixtures, generator_sizes, mixture_metrics
from pipeline.data.splits import EVAL_SPLITS, SPLIT_FILES, TRAIN_SPLITS
from pipeline.data.tasks import (
    Problem,
    TaskSpace,
    corrupt,
    draw_key,
    make_problem,
    problem_key_in_eval,
    prose_sentence,
    sample_corruption,
    worked_solution,
)
from pipeline.data.world import World, build_world, fact_document, story_document
from pipeline.io import atomic_dir, file_sha256
from pipeline.paths import MANIFEST

EVAL_SEED = "eval-v1"
_DOC_CHARS = (100, 400)


class _Generator:
    """Builds every split's rows and remembers each training key for the leakage audit."""

    def __init__(self, cfg: DataConfig, tick: Callable[[int], None]) -> None:
        self.cfg = cfg
        self.world: World = build_world(cfg.world.n_entities, cfg.world.seed)
        self.space = TaskSpace(cfg.digits, cfg.string_len.min, cfg.string_len.max, self.world)
        self.families = cfg.weights()
        self.train_keys: set[str] = set()
        self._tick = tick

    def _rng(self, split: str) -> random.Random:
        return random.Random(f"{split}:{self.cfg.seed}")

    def _train_key(self, family: str, rng: random.Random) -> str:
        key = draw_key(family, self.space, rng, self.cfg.eval_fraction, in_eval=False)
        if key is None:
            raise ValueError(f"family {family!r} has no problems outside the eval partition: lower "
                             "data.eval_fraction or enlarge its space (data.world.n_entities, data.digits)")
        self.train_keys.add(key)
        return key

    def _family_plan(self, total: int, rng: random.Random) -> list[str]:
        plan = [f for f, n in allocate(total, self.families).items() for _ in range(n)]
        rng.shuffle(plan)
        return plan

    # ------------------------------------------------------------ pretraining
    def pretrain(self, split: str, n_docs: int, avoid: set[str]) -> list[dict[str, str]]:
        rng = self._rng(split)
        kinds = [k for k, n in allocate(n_docs, PRETRAIN_MIX).items() for _ in range(n)]
        rng.shuffle(kinds)
        subjects = list(self.world.entities)
        rng.shuffle(subjects)
        rows: list[dict[str, str]] = []
        fact_i = 0
        for kind in kinds:
            for _ in range(20):  # retry the rare exact duplicate of a training document
                if kind == "fact":  # round-robin so every entity's facts appear
                    text = fact_document(self.world, subjects[fact_i % len(subjects)], rng)
                elif kind == "story":
                    text = story_document(self.world, rng.choice(subjects), rng)
                else:
                    text = self._problem_prose(kind, rng)
                if text not in avoid:
                    break
            fact_i += kind == "fact"
            rows.append({"text": text, "kind": kind})
            self._tick(1)
        return rows

    def _problem_prose(self, kind: str, rng: random.Random) -> str:
        families = ("add", "sub") if kind == "arith" else ("reverse", "sort", "count")
        target = rng.randint(_DOC_CHARS[0] + 20, _DOC_CHARS[1] - 100)
        text = ""
        while len(text) < target:
            sentence = prose_sentence(self._train_key(rng.choice(families), rng), self.world, rng)
            if text and len(text) + 1 + len(sentence) > _DOC_CHARS[1]:
                break
            text = f"{text} {sentence}" if text else sentence
        return text

    # ------------------------------------------------------------ chat splits
    def sft(self, n: int) -> list[dict[str, Any]]:
        """Chat demonstrations; `family`, `key`, `answer` describe the last exchange.

        A `cot.fraction` share asks for steps (the prompt ends with `cot.trigger`) and demonstrates a
        worked solution ending in `Answer: ...`; those are never given a demo error. A `multi_turn.fraction`
        share of the direct ones is preceded by 1 to max_turns - 1 earlier exchanges (other training
        problems, answered correctly), so the model learns to read a conversation, as in chat and
        few-shot prompts.
        """
        rng = self._rng("sft")
        rows = []
        errors = random.Random(f"demo_errors:{self.cfg.seed}")  # own stream: rate 0 leaves the rows as they were
        worked = random.Random(f"cot:{self.cfg.seed}")  # own streams too: fraction 0 leaves the rows as they were
        earlier = random.Random(f"multi_turn:{self.cfg.seed}")
        cot, turns = self.cfg.cot, self.cfg.multi_turn
        for family in self._family_plan(n, rng):
            p = make_problem(self._train_key(family, rng), self.world, rng)
            error, reply = self._demo_error(p.key, errors)
            prompt, steps = p.prompt, worked.random() < cot.fraction
            if steps:
                prompt, error, reply = f"{p.prompt} {cot.trigger}", None, worked_solution(p.key, self.world)
            history: list[Problem] = []
            if earlier.random() < turns.fraction and not steps:  # worked solutions stay single-turn (length)
                history = self._earlier_problems(earlier.randint(1, turns.max_turns - 1), earlier)
            messages = [m for h in history for m in ({"role": "user", "content": h.prompt},
                                                      {"role": "assistant", "content": h.answer})]
            messages += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": p.answer if reply is None else reply}]
            rows.append({"messages": messages, "family": family, "key": p.key, "answer": p.answer,
                         "demo_error": error, "cot": steps, "turns": len(messages) // 2,
                         "earlier_keys": [h.key for h in history]})
            self._tick(1)
        return rows

    def _earlier_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """`n` training problems for the earlier exchanges of a conversation (families by their weights)."""
        families = [f for f, w in self.families.items() if w > 0]
        weights = [self.families[f] for f in families]
        return [make_problem(self._train_key(f, rng), self.world, rng) for f in rng.choices(families, weights, k=n)]

    def _demo_error(self, key: str, rng: random.Random) -> tuple[str | None, str | None]:
        """With probability `demo_errors.rate`, a plausible wrong reply (kind, text) in place of the answer.

        Kinds are drawn among the configured ones that apply to the problem; a problem none applies to
        keeps its correct demonstration. The row's `answer` stays correct: only the demonstration errs.
        """
        cfg = self.cfg.demo_errors
        if rng.random() >= cfg.rate:
            return None, None
        family = key.partition(":")[0]
        kinds = [k for k in cfg.kinds if k in CORRUPTIONS[family]]
        rng.shuffle(kinds)
        for kind in kinds:
            wrong = corrupt(key, kind, self.world, rng)
            if wrong is not None:
                return kind, wrong
        return None, None

    def preference(self, n: int) -> list[dict[str, Any]]:
        rng = self._rng("preference")
        rows = []
        for family in self._family_plan(n, rng):
            p = make_problem(self._train_key(family, rng), self.world, rng)
            kind, rejected = sample_corruption(p.key, self.world, rng)
            rows.append({"prompt": p.prompt, "chosen": p.answer, "rejected": rejected, "corruption": kind,
                         "family": family, "key": p.key, "rejected_has_end": kind != "missing_end"})
            self._tick(1)
        return rows

    def rl_prompts(self, n: int) -> list[dict[str, str]]:
        rng = self._rng("rl_prompts")
        rows = []
        for family in self._family_plan(n, rng):
            p = make_problem(self._train_key(family, rng), self.world, rng)
            rows.append({"prompt": p.prompt, "answer": p.answer, "family": family, "key": p.key})
            self._tick(1)
        return rows

    # ------------------------------------------------------------ eval splits
    def eval_split(self, split: str, n: int, weights: dict[str, float],
                   exact_digits: int | None) -> list[dict[str, str]]:
        """Unique eval-partition keys; a family whose pool runs dry passes its remaining share on."""
        rng = random.Random(f"{split}:{EVAL_SEED}")
        pools: dict[str, list[str]] = {f: [] for f in weights}
        seen: set[str] = set()
        active = {f: w for f, w in weights.items() if w > 0}
        while active and sum(map(len, pools.values())) < n:
            want = allocate(n - sum(map(len, pools.values())), active)
            for family, count in want.items():
                misses = 0
                while count > 0 and misses < 200:
                    key = draw_key(family, self.space, rng, self.cfg.eval_fraction, in_eval=True,
                                   exact_digits=exact_digits)
                    if key is None:  # no eval key in 10k draws: the family has (almost) none
                        break
                    if key in seen:
                        misses += 1
                        continue
                    misses = 0
                    seen.add(key)
                    pools[family].append(key)
                    count -= 1
                if count > 0:  # pool exhausted (200 straight repeats): drop from later rounds
                    active.pop(family)
        rows = []
        for key in (k for f in weights for k in pools[f]):
            p = make_problem(key, self.world, rng)
            rows.append({"prompt": p.prompt, "answer": p.answer, "family": p.family, "key": p.key})
            self._tick(1)
        rng.shuffle(rows)
        return rows


def _hard_weights(families: dict[str, float]) -> dict[str, float]:
    w = {"add": families["add"], "sub": families["sub"]}
    return w if sum(w.values()) > 0 else {"add": 1.0, "sub": 1.0}


def generate(cfg: DataConfig, tick: Callable[[int], None] = lambda n: None,
             skip: frozenset[str] = frozenset()) -> tuple[dict[str, list[dict]], set[str]]:
    """All splits' rows (but those in `skip`) plus every key used for training (including pretraining prose).

    Each split draws from its own random stream, so skipping one leaves the others unchanged."""
    gen = _Generator(cfg, tick)
    s, families = cfg.sizes, cfg.weights()
    splits: dict[str, list[dict]] = {"pretrain": gen.pretrain("pretrain", s.pretrain_docs, set())}
    splits["pretrain_val"] = gen.pretrain("pretrain_val", s.pretrain_val_docs, {r["text"] for r in splits["pretrain"]})
    chat: dict[str, Callable[[], list[dict]]] = {
        "sft": lambda: gen.sft(s.sft),
        "preference": lambda: gen.preference(s.preference),
        "rl_prompts": lambda: gen.rl_prompts(s.rl_prompts),
        "eval": lambda: gen.eval_split("eval", s.eval, families, None),
        "eval_hard": lambda: gen.eval_split("eval_hard", s.eval_hard, _hard_weights(families), cfg.hard_digits),
    }
    splits.update({name: make() for name, make in chat.items() if name not in skip})
    return splits, gen.train_keys


def audit_leakage(splits: dict[str, list[dict]], train_keys: set[str], eval_fraction: float,
                  external_keys: frozenset[str] = frozenset()) -> int:
    """Count keys on the wrong side of the partition, or shared between training and eval.

    Rows whose key is in `external_keys` (read from the Hub or files: a whole split, or one source of a mixture)
    have no partition: for them only shared keys count, and training rows whose prompt (any user turn,
    whitespace and case aside) is an eval prompt with another key."""
    def hub(row: dict) -> bool:
        return row["key"] in external_keys

    def keys(names: tuple[str, ...], from_hub: bool) -> set[str]:
        return {r["key"] for name in names for r in splits[name] if hub(r) == from_hub}

    train, held = train_keys | keys(TRAIN_SPLITS, False), keys(EVAL_SPLITS, False)
    wrong_side = sum(problem_key_in_eval(k, eval_fraction) for k in train)
    wrong_side += sum(not problem_key_in_eval(k, eval_fraction) for k in held)
    shared = (train | keys(TRAIN_SPLITS, True)) & (held | keys(EVAL_SPLITS, True))
    if not external_keys:  # generated rows only: their keys say it all
        return wrong_side + len(shared)
    asked: dict[bool, set[str]] = {True: set(), False: set()}  # eval prompts, by whether read from the hub
    for name in EVAL_SPLITS:
        for r in splits[name]:
            asked[hub(r)].update(_prompts(r))
    copied = {r["key"] for name in TRAIN_SPLITS for r in splits[name] if r["key"] not in shared
              and not asked[True].union(asked[False] if hub(r) else ()).isdisjoint(_prompts(r))}
    return wrong_side + len(shared) + len(copied)


def _prompts(row: dict) -> set[str]:
    """What a row asks (a chat's user turns, else its prompt), whitespace collapsed and case folded."""
    texts = [m["content"] for m in row["messages"] if m["role"] == "user"] if "messages" in row else [row["prompt"]]
    return {" ".join(t.split()).casefold() for t in texts}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def prepare(cfg: DataConfig | dict, out_dir: Path, progress: bool = True) -> dict[str, float | int]:
    """Write all splits and manifest.json into `out_dir`, return flat metrics (a mapping is checked first)."""
    config = cfg if isinstance(cfg, DataConfig) else DataConfig.parse(cfg)
    check_sources(config)
    sources: dict[str, SourceConfig] = config.sources.external()
    sizes, unmade = generator_sizes(config)  # a mixture split's size is its generated entry's share
    skip = frozenset(sources) | unmade
    out_dir = Path(out_dir)
    bar = Progress(TextColumn("[bold]prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), disable=not progress)
    task = bar.add_task("generating", total=sum(n for s, n in sizes.model_dump().items() if s not in skip))
    with bar:
        generated, train_keys = generate(config.model_copy(update={"sizes": sizes}),
                                         lambda n: bar.advance(task, n), skip)
        counts: dict[str, dict[str, int]] = {}
        external_keys: set[str] = set()

        def read(split: str, where: str, source: SourceConfig) -> tuple[list[dict], dict[str, int]]:
            bar.update(task, description=f"reading {where} from {describe(source)}")
            rows, dropped = load_rows(split, source, where)
            external_keys.update(r["key"] for r in rows)
            return rows, dropped

        for split, source in sources.items():
            generated[split], counts[split] = read(split, f"data.sources.{split}", source)
        mixed = draw_mixtures(config, generated, read, EVAL_SEED)
        splits = {name: generated[name] for name in SPLIT_FILES}
        leaked = audit_leakage(splits, train_keys, config.eval_fraction, frozenset(external_keys))
        if leaked:
            raise RuntimeError(f"leakage audit found {leaked} eval-partition keys (or eval prompts) in training data; "
                               "refusing to write")
        bar.update(task, description="writing")
        import datasets  # deferred: importing it costs ~1 s and validation errors should be instant

        with _quiet_datasets(), atomic_dir(out_dir) as tmp:
            for split, rows in splits.items():
                datasets.Dataset.from_list(rows).to_json(tmp / SPLIT_FILES[split], lines=True, force_ascii=False)
            manifest = _manifest(config, splits, {f: file_sha256(tmp / f) for f in SPLIT_FILES.values()})
            if sources:  # only then: an all-generated config keeps the manifest it always had
                manifest["sources"] = {s: {**sources[s].model_dump(), **counts[s]} for s in sources}
            if mixed:
                manifest["mixtures"] = mixed
            (tmp / MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return _metrics(config, splits, leaked) | _source_metrics(sources, counts) | mixture_metrics(mixed)


def _manifest(config: DataConfig, splits: dict[str, list[dict]], hashes: dict[str, str]) -> dict[str, Any]:
    per_family = {
        name: dict(sorted(Counter(r["kind"] if name.startswith("pretrain") else r["family"] for r in rows).items()))
        for name, rows in splits.items()
    }
    return {
        "config": config.generator(),
        "files": dict(SPLIT_FILES),
        "counts": {name: len(rows) for name, rows in splits.items()},
        "per_family": per_family,
        "corruptions": dict(sorted(Counter(r["corruption"] for r in splits["preference"]).items())),
        "demo_errors": dict(sorted(Counter(r["demo_error"] for r in splits["sft"] if r["demo_error"]).items())),
        "sha256": hashes,
        "eval_partition": "sha256(key)[:8] as int / 2**32 < eval_fraction",
    }


def _metrics(config: DataConfig, splits: dict[str, list[dict]], leaked: int) -> dict[str, float | int]:
    eval_fact_keys = {r["key"] for r in splits["eval"] if r["family"] == "fact"}
    return {
        "pretrain_docs": len(splits["pretrain"]),
        "pretrain_chars": sum(len(r["text"]) for r in splits["pretrain"]),
        "pretrain_val_docs": len(splits["pretrain_val"]),
        "pretrain_val_chars": sum(len(r["text"]) for r in splits["pretrain_val"]),
        "sft_rows": len(splits["sft"]),
        "sft_unique_keys": len({r["key"] for r in splits["sft"]}),
        "sft_demo_error_rate": round(sum(r["demo_error"] is not None for r in splits["sft"])
                                     / max(1, len(splits["sft"])), 4),
        "sft_cot_rows": sum(r["cot"] for r in splits["sft"]),
        "sft_multi_turn_rows": sum(r["turns"] > 1 for r in splits["sft"]),
        "preference_rows": len(splits["preference"]),
        "rl_prompts_rows": len(splits["rl_prompts"]),
        "eval_rows": len(splits["eval"]),
        "eval_hard_rows": len(splits["eval_hard"]),
        "eval_fact_keys": len(eval_fact_keys),
        "world_entities": config.world.n_entities,
        "leaked_keys": leaked,
    }


def _source_metrics(sources: dict[str, SourceConfig], counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per hub-sourced split: rows skipped by its adapter and rows over `max_chars`."""
    return {f"{split}_{what}": counts[split][what] for split in sources for what in ("skipped", "too_long")}
