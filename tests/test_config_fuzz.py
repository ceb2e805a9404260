"""Bad config generated from the schemas: every field of the default config (the alignment method's included)
gets a misspelt key, a value of the wrong type, and where they apply a value out of its bounds, an unknown
choice and an empty string.

Each case runs the stage the way `python -m stages.<name>` does (`exit_codes` around `run_stage`, in-process),
in a directory holding outputs of an earlier run, and asserts: exit code 2; one message naming the dotted field
(the misspelt key's nearest setting, or the field itself with a valid example); no traceback; nothing new written
but the stage's log; the earlier outputs byte-identical. The valid example the message gives is applied in turn
and must be accepted (a fix that does not fix would be worse than none). Fields outside `align` run `prepare`
(the config is refused before its first step); the method's fields run `align`, whose method schema is checked
in its `check`, before any input is read.

The cases come from the schema's annotations, not from a list: a field added to a schema is fuzzed with no
change here. Misspelt Hydra overrides on the command line get the same treatment, in real `python -m pipeline`
processes.
"""
from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from omegaconf import OmegaConf
from pydantic import BaseModel

from pipeline.config.root import Config, load_config
from pipeline.config.schema import _constraints, _members, _Place

from conftest import REPO, venv_env

DEFAULT = OmegaConf.to_container(OmegaConf.load(REPO / "params.yaml"), resolve=True)


def method_schema() -> type[BaseModel]:
    from pipeline.alignment import methods
    return methods.module(DEFAULT["align"]["method"]).Config


def leaves(data: dict, schema: type[BaseModel], loc: tuple = ()) -> list[tuple[tuple, Any]]:
    """(loc, FieldInfo) of every leaf of `data` under `schema` (a mapping field counts as a leaf)."""
    found = []
    for key, value in data.items():
        place = _Place(schema, (*loc, key), "")
        info = place.info
        if info is None:
            continue
        nested = isinstance(value, dict) and value and any(
            isinstance(m, type) and issubclass(m, BaseModel) for m in _members(info.annotation))
        found += leaves(value, schema, (*loc, key)) if nested else [((*loc, key), info)]
    return found


def bases(info) -> list[Any]:
    """The alternatives of a field without their bounds: int, str, Literal[...], list[...]."""
    return [typing.get_args(m)[0] if typing.get_origin(m) is Annotated else m for m in _members(info.annotation)]


# a value of each kind, and the kinds of alternative that take it (a choice counts as a string)
KINDS = (("abc", {str, Literal}), (12345, {int, float}), ({"k": 1}, {dict, BaseModel}), ([1], {list, tuple}))


def wrong_type(info) -> Any | None:
    """The first of KINDS no alternative of the field takes."""
    kinds = {BaseModel if isinstance(b, type) and issubclass(b, BaseModel) else (typing.get_origin(b) or b)
             for b in bases(info)}
    if kinds & {Any}:
        return None
    return next((value for value, takers in KINDS if not kinds & takers), None)


def out_of_range(info) -> Any | None:
    numeric = [b for b in bases(info) if b in (int, float)]
    if not numeric:
        return None
    for c in _constraints(info):
        if isinstance(c, Ge):
            return c.ge - 1
        if isinstance(c, Gt):
            return c.gt
        if isinstance(c, Le):
            return c.le + 1
        if isinstance(c, Lt):
            return c.lt
    return None


@dataclass(frozen=True)
class Case:
    stage: str
    loc: tuple
    kind: str
    value: Any = None

    @property
    def path(self) -> str:
        return ".".join(self.loc)

    def __str__(self) -> str:
        return f"{self.path}:{self.kind}"

    def apply(self, data: dict) -> dict:
        data = copy.deepcopy(data)
        node = data
        for key in self.loc[:-1]:
            node = node[key]
        if self.kind == "misspelt":
            node[self.misspelt_key] = node.pop(self.loc[-1])
        else:
            node[self.loc[-1]] = self.value
        return data

    @property
    def misspelt_key(self) -> str:
        return self.loc[-1] + self.loc[-1][-1]  # a doubled last letter: the nearest setting is the original

    def culprit(self) -> str:
        if self.kind == "misspelt":
            parent = ".".join(self.loc[:-1])
            return f"{parent + '.' if parent else ''}{self.misspelt_key} is not a setting of " \
                   f"{parent or 'the config'}: did you mean {self.path}?"
        return self.path


def cases() -> list[Case]:
    found = []
    top = {k: v for k, v in DEFAULT.items() if k != "align"}
    groups = [("prepare", loc, info) for loc, info in leaves(top, Config)]
    groups += [("align", ("align", *loc), info) for loc, info in leaves(DEFAULT["align"], method_schema())
               if loc != ("method",)]
    for stage, loc, info in groups:
        found.append(Case(stage, loc, "misspelt"))
        for kind, value in (("wrong_type", wrong_type(info)), ("out_of_range", out_of_range(info))):
            if value is not None:
                found.append(Case(stage, loc, kind, value))
        if any(typing.get_origin(b) is Literal for b in bases(info)):
            found.append(Case(stage, loc, "unknown_choice", "nonexistent"))
        if str in bases(info):
            found.append(Case(stage, loc, "empty", ""))
    return found


CASES = cases()
# what an earlier run left: must be byte-identical after every refusal
EARLIER = {"data/prepared/sft.jsonl": b'{"messages": []}\n', "metrics/prepare.json": b'{"rows": 1}\n',
           "artifacts/aligned/meta.json": b'{"kind": "gpt"}\n', "metrics/align.json": b'{"iterations": 2}\n'}


def test_the_generated_cases_cover_every_field_and_are_many():
    fields = {c.path for c in CASES}
    assert len(CASES) >= 150 and len(fields) >= 200, (len(CASES), len(fields))
    assert {"sft.optim.lr", "trainer.devices", "seed", "align.kl_coef", "data.sources.eval.source"} <= fields
    assert {c.kind for c in CASES} == {"misspelt", "wrong_type", "out_of_range", "unknown_choice", "empty"}


def refuse(case: Case, data: dict, capsys) -> str:
    from pipeline.harness.runner import exit_codes, run_stage
    from stages import registry

    with pytest.raises(SystemExit) as stop, exit_codes(case.stage):
        run_stage(registry(), case.stage, OmegaConf.create(data))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    return err


def sha256s(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(work.rglob("*")) if p.is_file() and "logs" not in p.parts}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_bad_field_is_refused_before_work_naming_it_and_a_valid_example(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, content in EARLIER.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(content)
    before = sha256s(tmp_path)
    err = refuse(case, case.apply(DEFAULT), capsys)
    assert "Traceback" not in err
    assert case.culprit() in err, err
    assert sha256s(tmp_path) == before  # nothing new written, the earlier outputs as they were
    if case.kind == "misspelt":
        return
    line = next(line for line in err.splitlines() if case.path in line)
    assert f"(e.g. {case.path}=" in line or "choose" in line, line
    if f"(e.g. {case.path}=" in line:  # the example is a value the field takes
        example = yaml.safe_load(line.split(f"(e.g. {case.path}=", 1)[1].rsplit(")", 1)[0])
        fixed = Case(case.stage, case.loc, "example", example).apply(DEFAULT)
        cfg = load_config(fixed)
        if case.stage == "align":
            from pipeline.alignment import methods
            methods.load(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("sft.optim.lrr=1", "sft.optim.lrr is not a setting of sft.optim: did you mean sft.optim.lr?"),
    ("pretrain.max_stepz=3", "pretrain.max_stepz is not a setting of pretrain: did you mean pretrain.max_steps?"),
    ("+pretrain.max_stepz=3", "pretrain.max_stepz is not a setting of pretrain: did you mean pretrain.max_steps?"),
    ("modle=micro", "modle is not a setting of the config: did you mean model?"),
])
def test_a_misspelt_override_on_the_command_line_is_named_with_the_nearest(override, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=prepare", override], cwd=tmp_path,
                          env=venv_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()
