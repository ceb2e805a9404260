"""Shared fixtures: configs composed from the real conf/ and shrunk, and one trained micro chain.

The micro chain runs every stage once per test session, in-process, inside a temporary working
directory (artifact paths are repo-relative, so a chdir isolates it from the repo's own outputs).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# HF `datasets`' cache: a temp dir for this pytest run (its xdist workers inherit it; `datasets` locks what it
# writes), not the pipeline's default, the repo's own .cache/huggingface, which each run's temp data files grow.
# An HF_HOME set beforehand wins.
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gpt-pipeline-tests-hf-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parent.parent


def compose_micro(*overrides: str):
    """The micro experiment composed from conf/ (a DictConfig, as Hydra and params.yaml give it)."""
    from pipeline.config.load import compose
    return compose(["experiment=micro", *overrides])


def micro_config(*overrides: str):
    """The micro experiment as the typed Config a stage receives."""
    from pipeline.config.root import load_config
    return load_config(compose_micro(*overrides))


# pytest-xdist (`make test[-all]`: -n 2 --dist loadgroup) runs each group of tests on one worker, in collection order,
# and gives each worker process its own session and module fixtures. The tests that read `micro_repo` (~200 s to
# build) are one group; those that read `micro_chain` another, joined by the tests that start 2+ processes of
# their own (gloo ranks, torchrun: mark them `multiprocess`), so at most one of those runs at a time. Tests that
# read both are in the micro_repo group (that worker builds micro_chain too, ~15 s). Every other test is grouped
# with its module, which runs whole on one worker as it does serially (some modules' tests build on each other).
MULTIPROCESS_MODULES = {"test_distributed.py"}  # a whole module of multiprocess tests that is not marked so


def xdist_group_of(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    if "micro_repo" in fixtures:
        return "micro_repo"
    if "micro_chain" in fixtures or item.get_closest_marker("multiprocess") or item.path.name in MULTIPROCESS_MODULES:
        return "micro_chain"
    return item.nodeid.split("::")[0]


def xdist_suffix(item: pytest.Item) -> str:
    """What pytest-xdist appends to the nodeid under --dist loadgroup: "@" and the test's group names."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "@" + "_".join(sorted(names)) if names else ""


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            if not item.get_closest_marker("xdist_group"):  # else the group the test names itself
                item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))
    result = yield  # xdist's own hook (on a worker) appends "@<group>" to each nodeid: the scheduler reads it there
    if getattr(config.option, "loadgroup", False) and not any(i.nodeid.endswith(xdist_suffix(i)) for i in items):
        # pytest >= 9.2 keeps the nodeid in Node._id, and pytest-xdist <= 3.8 still writes the old attribute, so the
        # groups are silently lost (pytest-dev/pytest-xdist#1386): write the suffix where pytest reads it
        from _pytest.nodeid import NodeId  # pytest >= 9.2 only
        for item in items:
            old, params = item.id, "" if item.id.params is None else f"[{item.id.params}]"
            item._id = NodeId(path=old.path, names=(*old.names[:-1], old.names[-1] + params + xdist_suffix(item)))
    return result


@pytest.fixture
def micro_cfg():
    return compose_micro()


@pytest.fixture(scope="session")
def micro_chain(tmp_path_factory) -> Path:
    """A directory where the whole micro lifecycle has run (logger off); returns it."""
    from stages import run_stage

    work = tmp_path_factory.mktemp("chain")
    cfg = compose_micro()
    old = Path.cwd()
    os.chdir(work)
    try:
        run_stage("all", cfg)
    finally:
        os.chdir(old)
    return work


@pytest.fixture
def in_chain(micro_chain, monkeypatch) -> Path:
    monkeypatch.chdir(micro_chain)
    return micro_chain


def repo_copy(dest: Path) -> Path:
    """Copy the repo's tracked and untracked-but-not-ignored files into `dest` as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def venv_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the running interpreter's bin dir first on PATH (dvc, python)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(["dvc", *args], cwd=repo, env=venv_env(WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _no_network_prefix() -> list[str]:
    """`unshare -rn` (a user + network namespace: only a down loopback) where the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


NO_NETWORK = _no_network_prefix()
# secrets a user may have in the environment; the micro chain runs with these and must write none of them
SENTINELS = {"WANDB_API_KEY": secrets.token_hex(20), "HF_TOKEN": f"hf_{secrets.token_hex(17)}",
             "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}


# the micro chain's `dvc repro` is killed (SIGKILL) once in each of these stages, after the resume
# checkpoint of this step (micro: pretrain 20 steps, a checkpoint every 2; align 3 iterations, every 1)
KILLS = {"pretrain": 4, "align": 1}
CHECKPOINT_OF = {"pretrain": "pretrain", "align": "aligned"}


def run_until_checkpoint(cmd: list[str], cwd: Path, env: dict, stage: str, step: int, log: Path,
                         timeout: float = 600) -> int:
    """Start `cmd` in its own process group; SIGKILL the group once outputs/resume/<stage>/state.json
    records a checkpoint of at least `step`; return the step of the checkpoint left behind."""
    state = cwd / "outputs" / "resume" / stage / "state.json"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    saved = 0
    while saved < step:
        if proc.poll() is not None:
            raise AssertionError(f"{stage} ended (rc {proc.returncode}) before a checkpoint of step {step}:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {stage} checkpoint of step {step} within {timeout} s")
        saved = json.loads(state.read_text())["step"] if state.is_file() else 0  # replaced atomically
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"{stage} ended before it was killed"
    return json.loads(state.read_text())["step"]  # a later checkpoint may have landed meanwhile


@pytest.fixture(scope="session")
def micro_repo(tmp_path_factory) -> Path:
    """A temp copy of the repo defaulting to the micro experiment (W&B on), after `dvc repro`.

    The repro runs as a user would, with no network at all (NO_NETWORK), sentinel secrets in the
    environment and the pipeline's own defaults (no WANDB_MODE, HF_* offline variables or HF_HOME set).
    It is killed with SIGKILL in pretrain and again in align (KILLS), each time right after a resume
    checkpoint, and rerun: `kills.json` beside the repo records the step each kill left and the
    stage's outputs present right after it; `repro.log` holds the output of the final `dvc repro`."""
    repo = repo_copy(tmp_path_factory.mktemp("repo"))
    config = repo / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - experiment: null", "  - experiment: micro"))
    # micro's own override leaves W&B out; the default loggers (W&B and DVCLive) for this test
    micro = repo / "conf" / "experiment" / "micro.yaml"
    micro.write_text("".join(line for line in micro.read_text().splitlines(keepends=True)
                             if not line.startswith("  - override /logger:")))
    subprocess.run(["python", "-m", "pipeline.config"], cwd=repo, env=venv_env(), check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qam", "micro defaults"], cwd=repo, check=True, capture_output=True,
                   env=venv_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                GIT_COMMITTER_EMAIL="t@t"))
    env = venv_env(**SENTINELS, HOME=str(repo.parent / "home"))
    for var in ("WANDB_MODE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME"):
        env.pop(var, None)
    kills = {}
    for stage, step in KILLS.items():
        log = repo.parent / f"repro-killed-in-{stage}.log"
        killed_at = run_until_checkpoint([*NO_NETWORK, "dvc", "repro"], repo, env, stage, step, log)
        left = [p for p in (f"artifacts/{CHECKPOINT_OF[stage]}", f"metrics/{stage}.json") if (repo / p).exists()]
        left += [str(p.relative_to(repo)) for p in (repo / "artifacts").glob(".*tmp*")]
        kills[stage] = {"step": killed_at, "outputs_left": left}
    (repo.parent / "kills.json").write_text(json.dumps(kills))
    proc = subprocess.run([*NO_NETWORK, "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    (repo.parent / "repro.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return repo


def seeded_workspace(path: Path, *overrides: str) -> Path:
    """A micro workspace in `path`: prepared data, the tokenizer, and a seeded micro GPT as checkpoint `pretrain`
    (what sft trains on), in seconds; returns `path`."""
    import torch

    from pipeline.config.root import load_config
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.gpt import GPT
    from pipeline.model.handoff import checkpoint_meta, save_checkpoint
    from stages import run_stage

    old = Path.cwd()
    os.chdir(path)
    try:
        raw = compose_micro(*overrides)
        run_stage("prepare", raw)
        run_stage("tokenizer", raw)
        cfg, tok = load_config(raw), load_tokenizer(raw.tokenizer.special_tokens)
        torch.manual_seed(0)
        model = GPT(cfg.model.shape(tok.vocab_size))
        save_checkpoint("pretrain", model, checkpoint_meta(cfg, tok, model, "gpt", step=0))
    finally:
        os.chdir(old)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chain_copy(chain: Path, dest: Path) -> Path:
    """The micro chain's data and checkpoints copied into `dest`, with the micro config as its params.yaml (what
    the CLI reads), for `gpt-pipeline serve` and the CLI: its checkpoints are trained, so they answer in text."""
    from omegaconf import OmegaConf
    for part in ("artifacts", "data"):
        shutil.copytree(chain / part, dest / part)
    OmegaConf.save(compose_micro(), dest / "params.yaml")
    return dest


class Server:
    """`gpt-pipeline serve` in a process of its own (`start`), on a free local port: `url`, `log`, `stop`."""

    def __init__(self, workspace: Path, *args: str) -> None:
        self.workspace, self.args, self.port = workspace, args, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workspace / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Server:
        import urllib.request
        out = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port),
                                      *self.args], cwd=self.workspace, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpt-pipeline serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"gpt-pipeline serve did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
