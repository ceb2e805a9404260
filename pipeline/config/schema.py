"""The base of every config group's schema, and errors a person can act on.

Each group of conf/ has a schema in this package (`model`, `data`, `training`, `evaluate`, `align`; an
alignment method's own fields in its module); `pipeline.config.root.Config` assembles them. A schema is a
pydantic model: each field's type, default, bounds and docstring sit together, and checks across fields sit
in a validator beside them.
`Schema` refuses unknown keys and empty strings, does not coerce types (a string is not a number, a float
not an integer) and is frozen: a stage cannot change the config it was given.

Why pydantic rather than OmegaConf structured configs: Hydra's structured configs must be registered in
a ConfigStore at composition time, which DVC's own composition of conf/ (`dvc exp run -S`) never does;
they offer no Literal or bounded types, and no unions of groups (the strategies, the alignment methods).
pydantic is already installed with W&B.

`ConfigError` turns pydantic's errors into one line per problem that names the field (`sft.max_steps`),
the value and the fix: for an unknown key the nearest valid one, for a choice the choices, and for a value
a valid example (`e.g. sft.max_steps=1500`: the field's default, or a value its type and bounds allow). Validators
write `@` for the path of the model they check (`@.min must not exceed @.max`), so a schema used in
several places (every `optim`) names the right one.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from pipeline.paths import CONF_DIR

HERE = "@"  # in a validator's message: the dotted path of the model it validates
S = TypeVar("S", bound="Schema")


class ConfigError(ValueError):
    """A config that does not fit its schema; the message names each field, its value and the fix."""


class Schema(BaseModel):
    """Base of the config schemas: unknown keys refused, no type coercion, frozen, documented fields."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True,
                              str_min_length=1)  # an empty string is never a setting: null is "none"
    where: ClassVar[str] = ""
    """The config path this schema is usually found at, for messages when parsed alone (e.g. "data")."""

    @classmethod
    def parse(cls: type[S], data: Any, where: str | None = None) -> S:
        """Validate `data` (a mapping, or a DictConfig) into the schema, or raise ConfigError."""
        if hasattr(data, "_metadata"):  # a DictConfig: plain containers, interpolations resolved
            from omegaconf import OmegaConf
            data = OmegaConf.to_container(data, resolve=True)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(describe(err, cls, cls.where if where is None else where)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (what params.yaml holds for this group, with every default filled in)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------ describing pydantic's errors

def _members(annotation: Any) -> list[Any]:
    """The alternatives of a Union / X | Y annotation (the annotation itself otherwise)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _tags(info: FieldInfo) -> dict[str, type[BaseModel]]:
    """A discriminated union's members by tag (the Literal value of their discriminator field)."""
    key = info.discriminator
    if not isinstance(key, str):
        return {}
    return {tag: m for m in _models(info.annotation) for tag in typing.get_args(m.model_fields[key].annotation)}


def _choices(annotation: Any) -> list[Any]:
    return [v for m in _members(annotation) if typing.get_origin(m) is Literal for v in typing.get_args(m)]


def _optional(info: FieldInfo | None) -> bool:
    return info is not None and type(None) in typing.get_args(info.annotation)


def _either(values: list[Any]) -> str:
    names = [str(v) for v in values]
    if len(names) == 1:
        return names[0]
    return f"{names[0]} or {names[1]}" if len(names) == 2 else f"one of {', '.join(names)}"


def _constraints(info: FieldInfo) -> list[Any]:
    """A field's bounds, also where they sit on one alternative of an optional field (`Count | None`)."""
    found = list(info.metadata)
    for member in _members(info.annotation):
        if typing.get_origin(member) is Annotated:
            found += [c for meta in member.__metadata__ for c in getattr(meta, "metadata", [meta])]
    return found


def _bounds(info: FieldInfo | None) -> str | None:
    """The range a bounded field accepts, as people write it: "positive", ">= 1", "in [0, 1)"."""
    if info is None:
        return None
    metadata = _constraints(info)
    lo = next(((m.gt, "(") for m in metadata if isinstance(m, Gt)), None) or next(
        ((m.ge, "[") for m in metadata if isinstance(m, Ge)), None)
    hi = next(((m.lt, ")") for m in metadata if isinstance(m, Lt)), None) or next(
        ((m.le, "]") for m in metadata if isinstance(m, Le)), None)
    if lo and hi:
        return f"in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
    if lo:
        return "positive" if lo == (0, "(") else (f"> {lo[0]}" if lo[1] == "(" else f">= {lo[0]}")
    if hi:
        return f"< {hi[0]}" if hi[1] == ")" else f"<= {hi[0]}"
    return None


class _Place:
    """Where an error's `loc` points in the schema: its dotted path, the field and the model that owns it."""

    def __init__(self, cls: type[BaseModel], loc: tuple, where: str) -> None:
        self.parts = [where] if where else []
        self.owner: type[BaseModel] | None = None  # the model the last part belongs to (or should)
        self.info: FieldInfo | None = None
        self.union = False  # the error is one alternative's of a union of plain types (`int | "auto" | list`)
        models: list[type[BaseModel]] = [cls]
        tags: dict[str, type[BaseModel]] = {}
        plain_union = False
        for part in loc:
            if isinstance(part, str) and part in tags:  # the tag pydantic puts after a discriminated union
                models, tags = [tags[part]], {}
                continue
            if plain_union:  # pydantic names the alternative it tried (`constrained-int`): the field is the culprit
                self.union = True
                break
            owner, name = next(((m, n) for m in models for n, f in m.model_fields.items()
                                if isinstance(part, str) and part in (n, f.alias)), (None, None))
            self.parts.append(str(part) if isinstance(part, str) else f"[{part}]")
            if owner is None:  # a key the schema lacks, or a dict entry / list index
                self.owner, self.info = (models[0] if models else None), None
                models, tags = [], {}
                continue
            self.owner, self.info = owner, owner.model_fields[name]
            models, tags = _models(self.info.annotation), _tags(self.info)
            plain_union = not tags and not models and len(_members(self.info.annotation)) > 1

    @property
    def path(self) -> str:
        return ".".join(self.parts).replace(".[", "[")

    @property
    def parent(self) -> str:
        return ".".join(self.parts[:-1]).replace(".[", "[")


TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
         "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping"}


def _kind(annotation: Any) -> str:
    """What one alternative of a field accepts, as people say it: "an integer >= 1", "auto", "a list"."""
    if typing.get_origin(annotation) is Literal:
        return _either(list(typing.get_args(annotation)))
    base, bounds = annotation, None
    if typing.get_origin(annotation) is Annotated:
        base = typing.get_args(annotation)[0]
        bounds = _bounds(FieldInfo.from_annotation(annotation))
    name = getattr(typing.get_origin(base) or base, "__name__", str(base))
    words = TYPES.get({"str": "string"}.get(name, name), f"a {name}")
    return f"{words} {bounds}" if bounds and bounds != "positive" else (f"a positive {words.split()[-1]}"
                                                                       if bounds else words)


def _example(place: _Place) -> str:
    """` (e.g. path=value)`: a value the field accepts (its default, else one its type and bounds allow), as a
    Hydra override; empty where none is known."""
    info = place.info
    if info is None or not place.parts:
        return ""
    value: Any = info.get_default(call_default_factory=True) if not info.is_required() else None
    if info.examples:
        value = info.examples[0]
    elif value is None and not info.is_required() and _optional(info):
        return f" (e.g. {place.path}=null)"
    if value is None:
        for member in _members(info.annotation):
            choices = _choices(member)
            base = typing.get_args(member)[0] if typing.get_origin(member) is Annotated else member
            lo = next((c for c in _constraints(FieldInfo.from_annotation(member)) if isinstance(c, (Ge, Gt))), None)
            if choices:
                value = choices[0]
            elif base in (int, float):
                start = lo.ge if isinstance(lo, Ge) else (lo.gt + 1 if lo is not None else 1)
                value = base(start)
            elif base is bool:
                value = True
            if value is not None:
                break
    group = place.parts[0] if len(place.parts) == 1 else ""
    if (value is None or isinstance(value, BaseModel)) and group and (CONF_DIR / group).is_dir():
        return f" (choose one with {group}=<name>: files in conf/{group}/)"
    if value is None or isinstance(value, BaseModel):
        return ""
    if isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, float):
        shown = repr(value)
        if "e" in shown and "." not in shown:  # 1e-05 is a string to YAML 1.1: 1.0e-05 is a number everywhere
            shown = shown.replace("e", ".0e")
    elif isinstance(value, (list, tuple)):
        shown = "[" + ",".join(str(v) for v in value) + "]"
    else:
        shown = str(value)
        if isinstance(value, str) and _yaml_value(shown) != value:  # `{question}` would be read as a mapping
            shown = repr(value)
    return f" (e.g. {place.path}={shown})"


def _yaml_value(text: str) -> Any:
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _problem(e: dict, cls: type[BaseModel], where: str) -> str:
    place = _Place(cls, tuple(e["loc"]), where)
    line = _line(place, e)
    return line if "(e.g. " in line or "did you mean" in line else line + _example(place)


def _line(place: _Place, e: dict) -> str:
    path, kind, value, ctx = place.path, e["type"], e.get("input"), e.get("ctx") or {}
    if place.union and place.info is not None:
        kinds = [_kind(m) for m in _members(place.info.annotation)]
        return f"{path} is {value!r}: it must be {', '.join(kinds[:-1])} or {kinds[-1]}"
    if kind == "string_too_short" and value == "":
        return f"{path} is empty: give it a value" + (", or null" if _optional(place.info) else "")
    if kind == "extra_forbidden":
        key, fields = str(e["loc"][-1]), list(place.owner.model_fields) if place.owner else []
        near = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        scope = place.parent or "the config"
        fix = f"did you mean {place.parent + '.' if place.parent else ''}{near[0]}?" if near else (
            f"its settings are {', '.join(fields)}")
        return f"{path} is not a setting of {scope}: {fix}"
    if kind in ("missing", "union_tag_not_found"):
        key = str(e["loc"][-1]) if kind == "missing" else ctx.get("discriminator", "").strip("'")
        given = [k for k in (value if isinstance(value, dict) else {}) if isinstance(k, str)]
        near = difflib.get_close_matches(key, given, n=1, cutoff=0.6)
        scope = place.parent if kind == "missing" else path
        if near:  # the field is there, misspelt
            return (f"{scope + '.' if scope else ''}{near[0]} is not a setting of {scope or 'the config'}: "
                    f"did you mean {scope + '.' if scope else ''}{key}?")
    if kind == "missing":
        return f"{path} is missing: add it (see the defaults in conf/)"
    if kind == "union_tag_invalid":
        key = str(place.info.discriminator) if place.info else "name"
        tags = list(_tags(place.info)) if place.info else []
        group = place.parts[0] if place.parts else ""
        hint = f" ({group}=<name>, files in conf/{group}/)" if (CONF_DIR / group).is_dir() else ""
        return f"{path}.{key} {ctx.get('tag')!r} is unknown: choose {_either(tags)}{hint}"
    if kind == "union_tag_not_found":
        return f"{path} needs `{ctx.get('discriminator', '').strip(chr(39))}`: name which one to use"
    if kind == "literal_error":
        choices = _choices(place.info.annotation) if place.info else []
        group = place.parts[0] if len(place.parts) == 2 else ""
        hint = f" ({group}=<name>, files in conf/{group}/)" if group and (CONF_DIR / group).is_dir() else ""
        return f"{path} {value!r} is unknown: choose {_either(choices) if choices else e['msg']}{hint}"
    if kind == "value_error":  # our validators' own words
        message = str(ctx.get("error", e["msg"]))
        if HERE in message:
            return message.replace(f"{HERE}.", f"{path}." if path else "").replace(HERE, path or "the config")
        return f"{path} is {value!r}: {message}" if path else message
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rule = _bounds(place.info) if place.info and place.parts[-1] == str(e["loc"][-1]) else None
        return f"{path} is {value!r}: it must be {rule or e['msg'].removeprefix('Input should be ')}"
    for prefix, name in TYPES.items():
        if kind.startswith(prefix):
            return f"{path} is {value!r}: it must be {name}"
    return f"{path} is {value!r}: {e['msg']}"


def describe(err: ValidationError, cls: type[BaseModel], where: str = "") -> str:
    """One line per problem in `err` (validating `cls`, found at config path `where`)."""
    lines = list(dict.fromkeys(_problem(e, cls, where) for e in err.errors(include_url=False)))
    return "\n".join(lines)
