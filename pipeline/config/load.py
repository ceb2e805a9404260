"""Loading the composed configuration, whichever way a stage was started.

`dvc repro` runs `python -m stages.<name>`, which reads the committed `params.yaml` (DVC's Hydra
integration regenerates it from `conf/` under `dvc exp run`). `python -m pipeline` composes `conf/`
with Hydra. Both end in the same DictConfig, which `pipeline.config.root.load_config` validates into
the typed config every stage receives.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.paths import CONF_DIR, PARAMS_FILE

PARAMS_COMMAND = "make params"  # how a user regenerates params.yaml (python -m pipeline.config)


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate it with `{PARAMS_COMMAND}` (python -m pipeline.config), "
                                "or let `dvc exp run` compose conf/ into it")
    import yaml
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:  # the parser's own words name the line and column, not the file
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}): fix that line, or regenerate the file with "
                         f"`{PARAMS_COMMAND}`") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not a mapping of settings: regenerate it with "
                         f"`{PARAMS_COMMAND}`")
    return cfg


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose conf/ like DVC's Hydra integration does (interpolations resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


def write_params(overrides: list[str] | None = None, path: str | Path = PARAMS_FILE) -> Path:
    """params.yaml from conf/ plus `overrides`: what `dvc exp run -S ...` writes."""
    path = Path(path)
    path.write_text(OmegaConf.to_yaml(compose(overrides)), encoding="utf-8")
    return path


def check_overrides(args: list[str], config_dir: str | Path = CONF_DIR) -> None:
    """Command-line overrides of settings that do not exist, refused naming the nearest one (Hydra's own message
    says only that the key is not in the config). Group choices, additions (`+key=`, which the schemas check),
    deletions and Hydra's own settings are left to Hydra; a sweep's keys are checked like any other."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:
        return  # Hydra says what is wrong with the syntax
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    chosen = [o.input_line for o in overrides if o.key_or_group in groups and not o.is_sweep_override()
              and o.type.name == "CHANGE"]
    try:
        base = OmegaConf.to_container(compose(chosen, config_dir))
    except HydraException:
        return  # an unknown group option: Hydra lists the options
    for o in overrides:
        key = o.key_or_group
        if o.type.name != "CHANGE" or key in groups or "/" in key or key.split(".")[0] == "hydra":
            continue
        node: object = base
        parts = key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            if not isinstance(node, dict):
                break  # a key below a value: Hydra says so
            parent = ".".join(parts[:i])
            near = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
            fix = f"did you mean {parent + '.' if parent else ''}{near[0]}?" if near else (
                f"its settings are {', '.join(map(str, node))}")
            raise ValueError(f"{key} is not a setting of {parent or 'the config'}: {fix} (an override adds a new "
                             f"key only as +{key}=...)")
