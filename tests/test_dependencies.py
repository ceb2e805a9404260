"""The declared dependencies are true: the lock satisfies pyproject.toml, holds no CUDA build, and the loggers
the runtime dependencies promise (DVCLive with the arguments the pipeline sets, TensorBoard through tensorboardX)
work with what is installed. `.ci/run` runs this file in the lowest-direct environment too
(docs/dependencies.md), so the DVCLive and tensorboardX lower bounds are exercised there."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
LOCKED_EXTRAS = ("test", "sweep")  # what `make install` installs (Makefile: LOCK_EXTRAS)
CUDA_PREFIXES = ("nvidia-cu", "nvidia-nccl", "nvidia-nv", "triton", "cuda-")  # not nvidia-ml-py (NVML)


def locked() -> dict[str, str]:
    """{normalised name: version} of every pin in the lock."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared(extras: tuple[str, ...]) -> list:
    """The project's requirements with `extras`, self-references (gpt-pipeline[x]) followed."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo, seen, out = list(extras), set(), [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if req.name == project["name"]:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    from packaging.utils import canonicalize_name

    pins = locked()
    wrong = []
    for req in declared(LOCKED_EXTRAS):
        if req.marker and not req.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            wrong.append(f"{req.name}: not in {LOCK.name}")
        elif not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name}=={version} is outside pyproject.toml's {req}")
    assert not wrong, "requirements/lock.txt is stale: run `make lock`\n" + "\n".join(wrong)


def test_the_lock_holds_the_cpu_torch_and_no_cuda_package():
    pins = locked()
    assert pins["torch"].endswith("+cpu"), "the lock must name the CPU wheel (Makefile: TORCH_LOCK)"
    assert not [name for name in pins if name.startswith(CUDA_PREFIXES)]


def test_dvclive_logger_takes_the_arguments_the_pipeline_sets(tmp_path, monkeypatch):
    from dvclive.lightning import DVCLiveLogger

    monkeypatch.chdir(tmp_path)  # outside any DVC or Git repository, as a plain directory
    live = tmp_path / "dvclive" / "pretrain"
    logger = DVCLiveLogger(dir=str(live), resume=False, dvcyaml=False, save_dvc_exp=False)
    logger.log_metrics({"train/loss": 2.5}, step=0)
    logger.log_metrics({"train/loss": 2.0}, step=1)
    logger.finalize("success")
    rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().split()
    assert rows[-2:] == ["1", "2.0"] and not (tmp_path / "dvc.yaml").exists()


def test_tensorboard_logger_writes_events_without_the_tensorboard_package(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="pretrain")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize("success")
    assert list(tmp_path.glob("pretrain/version_0/events.out.tfevents.*"))

