"""The house rules: one list of stages, dvc.yaml as the chain says, code deps that cover every import, layers
that import downward only, no import cycle, and a killed stage that resumes only on the inputs it read.

The import graph is read from the source (pipeline.harness.imports), function-local imports included.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.harness import dvcfile, imports
from stages import registry

from conftest import REPO, micro_config, venv_env

CHAIN = registry()
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(d) or Path(d) in file.parents for d in deps)


def test_dvc_yaml_is_what_the_chain_says():
    assert (REPO / "dvc.yaml").read_text() == dvcfile.render(CHAIN), "dvc.yaml is stale: run `make dvc.yaml`"


def test_the_registry_and_dvc_yaml_agree_on_names_outs_params_metrics_and_plots():
    assert list(DVC["stages"]) == CHAIN.names
    for stage in CHAIN:
        spec, entry = stage.spec, DVC["stages"][stage.name]
        assert entry["cmd"] == f"python -m stages.{spec.name}"
        assert entry.get("params", []) == list(spec.params)
        declared = {next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics", "plots") for o in entry.get(key, [])}
        assert declared == {str(p) for p in spec.made()}, stage.name
        assert {str(p) for p in spec.deps()} <= set(entry["deps"])
    assert set(DVC["artifacts"]) == {a.name for a in CHAIN.artifacts() if a.in_dvc}


@pytest.mark.parametrize("stage", CHAIN.names)
def test_every_file_a_stage_may_import_is_one_of_its_deps(stage):
    """The import closure of `python -m stages.<stage>`, function-local imports counted, is covered by the
    stage's deps in the committed dvc.yaml: editing any of those files makes DVC rerun the stage."""
    deps = DVC["stages"][stage]["deps"]
    closure = imports.files(imports.stage_closure(stage))
    missing = sorted(str(f) for f in closure if not covered(f, deps))
    assert not missing, f"{stage} imports files dvc.yaml does not list: {missing}"


def test_the_checker_is_a_dep_of_the_stages_that_grade_answers_and_of_no_other():
    tasks = Path("pipeline/data/tasks.py")
    grading = {s for s in CHAIN.names if covered(tasks, DVC["stages"][s]["deps"])}
    assert grading == {"prepare", "reward", "align", "sft_control", "evaluate"}  # sft_control: via the methods
    assert not covered(tasks, DVC["stages"]["pretrain"]["deps"])


def test_no_import_cycle_function_local_imports_included():
    assert imports.cycles(imports.graph()) == []


def test_imports_go_downward_only():
    upward = [f"{m} (layer {imports.layer(m)}) imports {i} (layer {imports.layer(i)})"
              for m, targets in imports.graph().items() for i in targets if imports.layer(i) > imports.layer(m)]
    assert not upward, "\n".join(upward)
    assert all(imports.layer(m) >= 0 for m in imports.project_modules()), "a module outside every layer"


def test_the_analysis_counts_what_runs():
    """Function-local imports count, TYPE_CHECKING ones do not, a plugin package imports all it holds, and
    another stage's module counts for its declaration only."""
    assert "pipeline.training.lm" in imports.imports("stages.pretrain")  # inside run()
    assert "pipeline.config.root" not in imports.imports("pipeline.training.lm")  # annotations only
    methods = imports.imports("pipeline.alignment.methods")
    assert {"pipeline.alignment.methods.ppo", "pipeline.alignment.methods.dpo"} <= methods
    prepare = imports.stage_closure("prepare")
    assert "stages.pretrain" in prepare and "pipeline.training.lm" not in prepare


STAGE_NAMES = set(CHAIN.names)


def stage_lists(path: Path) -> list[str]:
    """Literal lists, tuples, sets and dict keys in `path` holding three or more stage names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else (
            node.keys if isinstance(node, ast.Dict) else [])
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in STAGE_NAMES]
        if len(names) >= 3:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {names}")
    return found


def test_no_second_list_of_stage_names():
    """The chain (stages.registry) is the only list of stages: the code derives every other from it (the
    tests iterate over it too; what they expect a stage to do they may still spell out)."""
    registry_module = REPO / "stages" / "__init__.py"
    lists = [hit for top in ("pipeline", "stages", "benchmarks") for p in sorted((REPO / top).rglob("*.py"))
             if p != registry_module for hit in stage_lists(p)]
    assert not lists, "\n".join(lists)


def test_a_killed_sft_control_resumes_only_on_the_sft_it_started_from(tmp_path, monkeypatch):
    """The resume fingerprint of a stage covers the checkpoints it reads: sft_control reads sft (it once
    fingerprinted pretrain, so a control killed mid-run resumed on top of a retrained SFT)."""
    from pipeline.training.resume import fingerprint
    monkeypatch.chdir(tmp_path)
    for name in ("pretrain", "sft"):
        (tmp_path / paths.checkpoint_dir(name)).mkdir(parents=True)
        (tmp_path / paths.checkpoint_dir(name) / "meta.json").write_text(json.dumps({"name": name, "step": 1}))
    cfg, spec = micro_config(), CHAIN["sft_control"].spec
    before = fingerprint(cfg, spec)
    (paths.checkpoint_dir("pretrain") / "meta.json").write_text(json.dumps({"name": "pretrain", "step": 2}))
    assert fingerprint(cfg, spec) == before  # not an input of the control
    (paths.checkpoint_dir("sft") / "meta.json").write_text(json.dumps({"name": "sft", "step": 2}))
    assert fingerprint(cfg, spec) != before  # a new SFT: the killed control must start over
    assert "sft" in spec.checkpoints_read(cfg) and "pretrain" not in spec.checkpoints_read(cfg)


@pytest.fixture(scope="module")
def status_repo(micro_repo, tmp_path_factory) -> Path:
    """A copy of the reproduced micro repo (its DVC cache included) to edit code in."""
    dest = tmp_path_factory.mktemp("status") / "repo"
    shutil.copytree(micro_repo, dest, symlinks=True, ignore=shutil.ignore_patterns("wandb", "tmp"))
    return dest


def dvc_status(repo: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    out = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=venv_env(), capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return {name.split(":")[-1] for name in json.loads(out or "{}")}


@pytest.mark.slow
@pytest.mark.parametrize("file", ["pipeline/data/tasks.py", "pipeline/model/gpt.py"])
def test_editing_a_file_makes_dvc_status_report_every_stage_that_imports_it(status_repo, file):
    """Editing the checker reports prepare, reward, align, the control and evaluate, and not pretraining."""
    assert dvc_status(status_repo) == set()
    importers = {s for s in CHAIN.names if Path(file) in imports.files(imports.stage_closure(s))}
    path = status_repo / file
    original = path.read_bytes()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        assert importers and dvc_status(status_repo) == importers
    finally:
        path.write_bytes(original)
    if file == "pipeline/data/tasks.py":
        assert importers == {"prepare", "reward", "align", "sft_control", "evaluate"}
