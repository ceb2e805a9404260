"""dvc.yaml, written from the chain: every stage's command, deps (its inputs, the checkpoints it may read and
the code its process may import), params, outs, metrics and plots, and the artifact registry.

    python -m pipeline.harness.dvcfile            # rewrite dvc.yaml (make dvc.yaml)
    python -m pipeline.harness.dvcfile --check    # exit 1 if dvc.yaml is not what the chain says

Generated rather than checked: a hand-kept list drifts as soon as an import moves (the hand-written
dvc.yaml this replaced lacked 243 (stage, file) pairs its stages imported), and a check would only say
so. The code deps are each stage's import closure (pipeline.harness.imports), so editing any file a stage
imports makes DVC rerun that stage and what follows it; a folder stands for its files when the stage
imports all of them (its `__main__.py` aside, a command nothing imports).
"""
from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import yaml

from pipeline import paths
from pipeline.harness import imports
from pipeline.registry import Chain, Stage

HEADER = """\
# Written by `python -m pipeline.harness.dvcfile` (make dvc.yaml) from the chain in stages/; edit the stage's
# StageSpec (stages/<name>.py), not this file. A test fails when this file is not what the chain says.
#
# Each stage: its inputs, the checkpoints it may read and every file of code its process may import as deps,
# only the config keys that change its outputs as params (params.yaml is composed from conf/), fixed output
# paths, small JSON metrics kept in git, DVCLive's files of the training stages as metrics and plots.
"""


@cache
def _importable_files(root: Path) -> frozenset[Path]:
    """The project's .py files a stage could import: a folder's __main__.py is a command no stage imports, so
    it does not keep the folder from standing for the rest."""
    return frozenset(p.relative_to(root) for top in paths.CODE_DIRS for p in (root / top).rglob("*.py")
                     if "__pycache__" not in p.parts and p.name != "__main__.py")


def code_deps(stage: str, root: Path = paths.PROJECT_ROOT) -> list[str]:
    """The project files `python -m stages.<stage>` may import, a folder in place of its files where the
    stage imports all of them."""
    used = imports.files(imports.stage_closure(stage, root), root)
    every = _importable_files(root)

    def complete(folder: Path) -> bool:
        return all(p in used for p in every if folder in p.parents)

    deps: set[Path] = set()
    for file in used:
        folders = [f for f in reversed(file.parents) if f != Path(".") and complete(f)]
        deps.add(folders[0] if folders else file)
    return sorted(str(d) for d in deps)


def stage_entry(stage: Stage) -> dict:
    spec = stage.spec
    entry: dict = {"desc": spec.desc, "cmd": f"python -m stages.{spec.name}",
                   "deps": [*(str(p) for p in spec.deps()), *code_deps(spec.name)]}
    if spec.params:
        entry["params"] = list(spec.params)
    outs: list = [str(c.path) for c in spec.writes]
    outs += [o.path if o.cache else {o.path: {"cache": False}} for o in spec.outs]
    if outs:
        entry["outs"] = outs
    entry["metrics"] = [{str(spec.metrics_file): {"cache": False}}]
    plots = []
    if spec.live:  # DVCLive's files, rewritten as the stage trains: every scalar's step file is a plot
        live_metrics, live_plots = spec.live
        entry["metrics"].append({str(live_metrics): {"cache": False}})
        plots.append({str(live_plots): {"cache": False, "x": "step"}})
    for p in spec.plots:
        options = {"cache": False, **({"template": p.template} if p.template else {}),
                   **({"x": p.x} if p.x else {}), **({"y": p.y} if p.y else {})}
        plots.append({p.path: options})
    if plots:
        entry["plots"] = plots
    return entry


def dvc_yaml(chain: Chain) -> dict:
    """dvc.yaml as data: the stages, the plots over several columns, the artifact registry."""
    multi = [{f"{s.name}_{c.name}": {"x": "step", "y": {str(paths.live_metric(s.name, y)): y.rsplit("/", 1)[-1]
                                                        for y in c.y}}}
             for s in chain for c in s.spec.curves]
    registry = {a.name: {"path": a.path, "type": a.type, "desc": a.desc, "labels": list(a.labels)}
                for a in chain.artifacts() if a.in_dvc}
    return {"stages": {s.name: stage_entry(s) for s in chain}, "plots": multi, "artifacts": registry}


def render(chain: Chain) -> str:
    return HEADER + yaml.safe_dump(dvc_yaml(chain), sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    from stages import registry

    argv = sys.argv[1:] if argv is None else argv
    text = render(registry())
    current = paths.DVC_FILE.read_text() if paths.DVC_FILE.is_file() else ""
    if "--check" in argv:
        if text != current:
            print(f"{paths.DVC_FILE} is not what the chain says: run `make dvc.yaml`", file=sys.stderr)
            return 1
        return 0
    paths.DVC_FILE.write_text(text)
    print(f"wrote {paths.DVC_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
