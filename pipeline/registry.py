"""What a stage is: its declaration (`StageSpec`) and the ordered chain of them (`Chain`).

Each module of `stages/` declares one `StageSpec` beside its `run`; `stages.registry()` puts them in chain
order. That chain is the only list of stage names: the runner, input validation, resume fingerprints,
dvc.yaml (`pipeline.harness.dvcfile` writes it from the chain), W&B lineage, the report's order, evaluate's
checkpoints, the CLI's `--stage` choices and the tests all derive from it.

A spec holds facts, no behaviour beyond deriving paths from them, and imports nothing heavy: reading the
whole chain must stay cheap in every stage's process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline import paths

if TYPE_CHECKING:
    from pipeline.config.root import Config

KINDS = ("gpt", "reward")  # what a checkpoint holds: a language model, or a reward model (GPT + scalar head)


@dataclass(frozen=True)
class Artifact:
    """A registered object: an entry of dvc.yaml's `artifacts:` (DVC Studio, `dvc artifacts get`) and a
    W&B artifact with lineage. `in_dvc=False`: W&B only (a git-tracked file, which DVC's registry cannot serve)."""

    name: str
    path: str
    type: str
    desc: str
    labels: tuple[str, ...] = ()
    in_dvc: bool = True

    def covers(self, path: str | Path) -> bool:
        path = str(path)
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint a stage writes: `artifacts/<name>/` (meta.json + model.safetensors), loaded by name."""

    name: str
    kind: str
    desc: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def path(self) -> Path:
        return paths.checkpoint_dir(self.name)

    def artifact(self) -> Artifact:
        return Artifact(self.name, str(self.path), "model", self.desc, self.labels)


@dataclass(frozen=True)
class Out:
    """An output file or directory besides the checkpoints; `cache=False` keeps it in git instead."""

    path: str
    cache: bool = True


@dataclass(frozen=True)
class Curve:
    """One chart of a training stage's scalars over the step, a line per name in `y` (e.g. train/loss and
    val/loss), from DVCLive's step files (paths.live_metric): one of dvc.yaml's top-level plots, `<stage>_<name>`.
    Each scalar also has a plot of its own (the stage's DVCLive directory is its plots)."""

    name: str
    y: tuple[str, ...]


@dataclass(frozen=True)
class Plot:
    """Any other DVC plot: a JSON file (x, y, template) or a directory of images (x = y = None)."""

    path: str
    x: str | None = None
    y: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it reads (config, inputs, checkpoints, splits) and what it writes."""

    name: str
    desc: str
    params: tuple[str, ...] = ()
    """The config keys whose values change this stage's outputs (dvc.yaml `params`). Keys that change
    nothing a stage computes (logger, run, resume, stage) are read by every stage and never listed."""
    inputs: tuple[Path, ...] = ()
    """What earlier stages wrote that this stage reads, besides checkpoints (data/prepared, the tokenizer...)."""
    reads: Mapping[str, str] = field(default_factory=dict)
    """Checkpoints it always reads: name -> kind."""
    reads_for: Callable[[Config | None], Mapping[str, str]] | None = None
    """Checkpoints it reads only under some configs: called with the config, or with None for every one
    it may read under any config (dvc.yaml's deps, which cannot depend on params)."""
    reads_every: str | None = None
    """A checkpoint kind: this stage reads every checkpoint of that kind in the chain (evaluate)."""
    reads_metrics: bool = False
    """It reads the metrics and DVCLive files of every earlier stage (report)."""
    splits: tuple[str, ...] | Callable[[Config], tuple[str, ...]] = ()
    """The prepared splits it reads (each checked, row by row, before work)."""
    writes: tuple[Checkpoint, ...] = ()
    outs: tuple[Out, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    """Registered objects among its outputs besides its checkpoints (which always are)."""
    curves: tuple[Curve, ...] = ()
    """Charts of several of its scalars together (a training stage's every scalar is plotted alone anyway)."""
    plots: tuple[Plot, ...] = ()
    trains: bool = False
    """It trains through Lightning (pipeline.training.trainer.fit): resume checkpoints in outputs/resume/<name>,
    DVCLive's files in dvclive/<name>/ (`live`)."""
    producers: Mapping[str, str] = field(default_factory=dict)
    """Filled in by the Chain: the stage that writes each checkpoint (what to rerun when one is missing)."""

    @property
    def metrics_file(self) -> Path:
        return paths.metrics_file(self.name)

    def checkpoints_read(self, cfg: Config) -> dict[str, str]:
        """The checkpoints this stage reads under `cfg`: name -> kind."""
        return {**self.reads, **(self.reads_for(cfg) if self.reads_for else {})}

    def all_reads(self) -> dict[str, str]:
        """Every checkpoint it may read under any config."""
        return {**self.reads, **(self.reads_for(None) if self.reads_for else {})}

    def splits_read(self, cfg: Config) -> tuple[str, ...]:
        return self.splits(cfg) if callable(self.splits) else tuple(self.splits)

    def checkpoint(self, kind: str) -> str:
        """The name of the one checkpoint of `kind` it always reads (its starting point)."""
        names = [n for n, k in self.reads.items() if k == kind]
        if len(names) != 1:
            raise ValueError(f"stage {self.name!r} reads {len(names)} {kind!r} checkpoints, not one: {names}")
        return names[0]

    def deps(self) -> list[Path]:
        """Its data dependencies: the inputs and every checkpoint it may read (code deps are computed)."""
        return [*self.inputs, *(paths.checkpoint_dir(n) for n in self.all_reads())]

    @property
    def live(self) -> tuple[Path, Path] | None:
        """A training stage's DVCLive files: (its metrics.json, the directory of its step files); None otherwise."""
        live = paths.live_dir(self.name)
        return (live / "metrics.json", live / "plots" / "metrics") if self.trains else None

    def replaced(self) -> list[Path]:
        """What it writes as whole directories, replaced at once (pipeline.io.atomic_dir): checkpoints and the
        cached outs."""
        return [*(c.path for c in self.writes), *(Path(o.path) for o in self.outs if o.cache)]

    def made(self) -> list[Path]:
        """Everything it writes: checkpoints, outs, metrics (its own and DVCLive's), DVCLive's plots and plots."""
        return [*(c.path for c in self.writes), *(Path(o.path) for o in self.outs), self.metrics_file,
                *(self.live or ()), *(Path(p.path) for p in self.plots)]


@dataclass(frozen=True)
class Stage:
    """A stage as the chain runs it: its resolved spec and the module that declared it."""

    spec: StageSpec
    module: ModuleType

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self, cfg: Config) -> None:
        """Its checks of the inputs earlier stages wrote (module `check(cfg, spec)`), before any work."""
        check = getattr(self.module, "check", None)
        if check is not None:
            check(cfg, self.spec)

    def run(self, cfg: Config) -> dict[str, Any]:
        return self.module.run(cfg, self.spec)


class Chain(Sequence[Stage]):
    """The stages in order. Resolves what a spec states relative to the chain (`reads_every`,
    `reads_metrics`) and knows which stage writes each checkpoint."""

    def __init__(self, modules: Sequence[ModuleType]) -> None:
        specs = [m.SPEC for m in modules]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        written = [c for s in specs for c in s.writes]
        self._producer = {c.name: s.name for s in specs for c in s.writes}
        if len(self._producer) != len(written):
            raise ValueError("two stages write a checkpoint of the same name")
        stages = []
        for i, (spec, module) in enumerate(zip(specs, modules)):
            if spec.reads_every:
                every = {c.name: c.kind for c in written if c.kind == spec.reads_every}
                spec = replace(spec, reads={**every, **spec.reads}, reads_every=None)
            if spec.reads_metrics:
                earlier = [paths.metrics_file(s.name) for s in specs[:i]]
                spec = replace(spec, inputs=(*spec.inputs, *earlier, paths.LIVE), reads_metrics=False)
            unknown = [n for n in spec.reads if n not in self._producer]
            if unknown:
                raise ValueError(f"stage {spec.name!r} reads checkpoints no stage writes: {unknown}")
            spec = replace(spec, producers=dict(self._producer))
            stages.append(Stage(spec, module))
        self._stages = stages
        self._by_name = {s.name: s for s in stages}

    def __getitem__(self, key):  # by position (Sequence) or by stage name
        if isinstance(key, str):
            if key not in self._by_name:
                raise ValueError(f"unknown stage {key!r}: choose one of {', '.join(self.names)} (or `all`)")
            return self._by_name[key]
        return self._stages[key]

    def __len__(self) -> int:
        return len(self._stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._stages]

    def producer(self, checkpoint: str) -> str:
        """The stage that writes `checkpoint` (what to rerun when it is missing or stale)."""
        if checkpoint not in self._producer:
            raise ValueError(f"unknown checkpoint {checkpoint!r}: choose one of {', '.join(self._producer)}")
        return self._producer[checkpoint]

    def checkpoints(self, kind: str | None = None) -> list[Checkpoint]:
        """Every checkpoint the chain writes (of `kind`), in chain order."""
        return [c for s in self._stages for c in s.spec.writes if kind is None or c.kind == kind]

    def artifacts(self) -> list[Artifact]:
        """Every registered object: the checkpoints and each stage's other artifacts, in chain order."""
        return [a for s in self._stages for a in (*(c.artifact() for c in s.spec.writes), *s.spec.artifacts)]

    def trained(self) -> list[str]:
        """The stages that train, in order."""
        return [s.name for s in self._stages if s.spec.trains]
