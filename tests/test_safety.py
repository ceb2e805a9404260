"""Reliability and safety: nothing unpickles a file it was handed, no secret reaches a file, no network never hangs.

- The code that loads checkpoints is checked statically (AST): every `torch.load` passes
  `weights_only=True`, nothing calls pickle/dill/joblib/shelve loaders, `np.load` never allows pickles,
  and a Lightning `fit/validate/test/predict` given a `ckpt_path` passes `weights_only=True`.
- The micro chain's `dvc repro` (the `micro_repo` fixture) runs inside a user + network namespace
  (`unshare -rn`: only a down loopback), with sentinel secrets in the environment and the pipeline's own
  offline defaults: it finishes, W&B writes offline run files, and no file of the repo nor the output
  holds a sentinel. A hub dataset asked for with no network fails fast, naming the fix.
- `WANDB_MODE=online` with no network logs offline within seconds, with a warning naming `wandb sync`,
  instead of W&B retrying ~90 s and failing the stage (pipeline/harness/wandb_mode.py).
"""
from __future__ import annotations

import ast
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NO_NETWORK, REPO, SENTINELS, venv_env

SCANNED = ("pipeline", "stages", "benchmarks")
# fully qualified callables that unpickle whatever they are given
UNPICKLERS = {f"{m}.{f}" for m in ("pickle", "_pickle", "cPickle", "dill") for f in ("load", "loads", "Unpickler")} | {
    "joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads", "torch.serialization.load"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
CKPT_METHODS = {"fit", "validate", "test", "predict"}  # Lightning Trainer methods taking ckpt_path


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_none(node: ast.AST | None) -> bool:
    return node is None or (isinstance(node, ast.Constant) and node.value is None)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def unsafe_loads(source: str, filename: str) -> list[str]:
    """`file:line: problem` for every call in `source` that may unpickle untrusted bytes."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> fully qualified ("np" -> "numpy", "load" -> "torch.load")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    problems = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset)):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        name = _dotted(node.func)
        if name:
            head, _, rest = name.partition(".")
            full = ".".join(filter(None, [aliases.get(head, head), rest]))
            if full in TORCH_LOADS and not _is_true(kw.get("weights_only")):
                problems.append(f"{where}: {name}(...) without weights_only=True")
            elif full in UNPICKLERS or full.split(".")[0] == "dill":
                problems.append(f"{where}: {name}(...) unpickles its input")
            elif full in NUMPY_LOADS and not _is_none(kw.get("allow_pickle")) and not (
                    isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                problems.append(f"{where}: {name}(..., allow_pickle=...) unpickles its input")
        if (isinstance(node.func, ast.Attribute) and node.func.attr in CKPT_METHODS
                and not _is_none(kw.get("ckpt_path")) and not _is_true(kw.get("weights_only"))):
            problems.append(f"{where}: .{node.func.attr}(ckpt_path=...) without weights_only=True "
                            "(Lightning passes weights_only=None on to torch.load)")
    return problems


def test_the_checker_finds_each_unsafe_load():
    bad = """
import pickle as pk, numpy as np, joblib, dill
from torch import load
import torch
torch.load(f)
torch.load(f, weights_only=False)
load(f)
pk.loads(b)
pk.Unpickler(f).load()
joblib.load(f)
dill.load(f)
np.load(f, allow_pickle=True)
trainer.fit(m, ckpt_path=p)
trainer.fit(m, ckpt_path=p, weights_only=None)
"""
    found = [p.split(": ", 1)[0] for p in unsafe_loads(bad, "x.py")]
    assert found == [f"x.py:{n}" for n in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14)], unsafe_loads(bad, "x.py")
    good = """
import torch, pickle, numpy as np
torch.load(f, map_location="cpu", weights_only=True)
pickle.dumps(x)
np.load(f)
np.load(f, allow_pickle=False)
trainer.fit(m, datamodule=d)
trainer.fit(m, ckpt_path=None)
trainer.fit(m, ckpt_path=p, weights_only=True)
"""
    assert unsafe_loads(good, "y.py") == []


def test_no_code_unpickles_a_file_it_is_handed():
    problems = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            problems += unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
    assert not problems, "unsafe loads (use safetensors or torch.load(..., weights_only=True)):\n" + "\n".join(problems)


# ------------------------------------------------------------------ no network, sentinel secrets

UNSHARE_ONLY = pytest.mark.skipif(not NO_NETWORK, reason="needs `unshare -rn` (user + network namespaces)")


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in (".git", ".venv") or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        hits += [f"{rel} holds {needle[:6].decode()}..." for needle in needles if needle in data]
    return hits


@pytest.mark.slow
@UNSHARE_ONLY
def test_the_chain_runs_with_no_network_and_writes_no_secret(micro_repo):
    """The `micro_repo` fixture ran `dvc repro` of the whole chain under `unshare -rn`, with sentinel
    secrets in the environment and the pipeline's own offline defaults (conftest): it finished (the
    fixture bounds it), W&B wrote offline files, and no file nor the output holds a sentinel."""
    assert list((micro_repo / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run files"
    assert (micro_repo / "artifacts" / "aligned" / "model.safetensors").is_file()
    leaks = _files_holding(micro_repo, [s.encode() for s in SENTINELS.values()])
    log = (micro_repo.parent / "repro.log").read_text()
    leaks += [f"dvc repro's output holds {s[:6]}..." for s in SENTINELS.values() if s in log]
    assert not leaks, "secrets from the environment were written out:\n" + "\n".join(leaks)


@UNSHARE_ONLY
def test_a_hub_source_with_no_network_fails_fast_with_the_fix(tmp_path):
    """`datasets` asked for a Hub dataset with no network: the offline default refuses at once, naming
    the local-files alternative, instead of retrying."""
    env = venv_env(HOME=str(tmp_path / "home"))
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME"):  # the pipeline's defaults apply
        env.pop(var, None)
    hub_eval = ["data.sources.eval.source=hub", "data.sources.eval.adapter=gsm8k",
                "data.sources.eval.path=openai/gsm8k", "data.sources.eval.name=main", "data.sources.eval.split=test"]
    start = time.monotonic()
    done = subprocess.run([*NO_NETWORK, sys.executable, "-m", "pipeline", "stage=prepare", "experiment=micro",
                           *hub_eval], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - start < 60  # refused like any bad input, no traceback
    assert "error in stage 'prepare'" in done.stderr and "Traceback" not in done.stderr
    assert "could not open the dataset" in done.stderr and "source: files" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "data" / "prepared").exists()


ONLINE_PROBE = """
import os, sys, time
from pipeline.config.load import compose
from pipeline.config.root import load_config
from pipeline.harness.runner import setup_environment
start = time.monotonic()
setup_environment(load_config(compose(["experiment=micro", "logger=wandb"])))
print("mode", os.environ["WANDB_MODE"], round(time.monotonic() - start, 1), flush=True)
if os.environ["WANDB_MODE"] == "online":
    sys.exit(3)  # wandb.init would retry ~90 s and raise
import wandb
run = wandb.init(project="safety", dir=sys.argv[1])
run.log({"x": 1.0})
run.finish()
"""


@UNSHARE_ONLY
def test_wandb_online_without_network_logs_offline_in_seconds(tmp_path):
    key = secrets.token_hex(20)
    env = venv_env(WANDB_MODE="online", WANDB_API_KEY=key, HOME=str(tmp_path))
    start = time.monotonic()
    try:
        done = subprocess.run([*NO_NETWORK, sys.executable, "-c", ONLINE_PROBE, str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("WANDB_MODE=online with no network did not finish within 60 s")
    seconds = time.monotonic() - start
    assert done.returncode == 0, ("still online with no network (wandb.init would fail after ~100 s):\n"
                                  f"{done.stdout}{done.stderr[-2000:]}")
    assert "logging offline" in done.stderr and "wandb sync" in done.stderr, done.stderr[-2000:]
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")) and seconds < 30, seconds
    assert not _files_holding(tmp_path, [key.encode()]) and key not in done.stdout + done.stderr
