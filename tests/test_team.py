"""The team workflow with real DVC, git and W&B files: a run pushed to the DVC remote and pulled into a
fresh clone instead of retrained, experiments shared through a git remote, W&B artifact lineage from
the data to the aligned model, and one run identity in every place a number can be traced from.

The slow tests read the `micro_repo` fixture (the micro chain after `dvc repro`); those that push,
pull or run experiments work on their own copy of it, with the run committed as a teammate would.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from stages import registry

from conftest import REPO, venv_env
from wandb_records import run_info

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"}
STAGES = tuple(registry().names)
NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-/_]*[a-zA-Z0-9])?")  # an artifact name or label for GTO (gto.constants.name)


def sh(cwd: Path, *cmd: str, **env: str) -> str:
    """Run a command (dvc, git) in `cwd`; fail the test with its output unless it succeeds."""
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(**GIT_IDENTITY, WANDB_MODE="offline", **env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def committed_copy(micro_repo: Path, dest: Path) -> Path:
    """A copy of the micro run (its DVC cache included, W&B files and DVC's temp dir not) with
    dvc.lock, metrics and report committed."""
    skip = {micro_repo / "wandb", micro_repo / ".dvc" / "tmp"}
    shutil.copytree(micro_repo, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "micro run")
    return dest


def declared_outs(repo: Path) -> list[str]:
    """Every `outs` path of dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]


def experiments(repo: Path) -> dict[str, dict]:
    """{experiment name: its `data` entry (params, metrics)} from `dvc exp show --json`."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    return {exp["name"]: exp["revs"][0]["data"] for baseline in shown for exp in (baseline.get("experiments") or [])
            if exp.get("name")}


def test_the_default_remote_is_per_user_and_the_registry_names_every_checkpoint():
    """The committed default remote lies under `~` (DVC expands it), so every clone of one user on a
    machine shares it; each `artifacts:` entry is a DVC-tracked output (pushed, pulled) with the fields
    and names DVC Studio and GTO accept."""
    from configobj import ConfigObj  # what DVC reads its config with

    conf = ConfigObj(str(REPO / ".dvc" / "config"))
    assert conf[f'remote "{conf["core"]["remote"]}"']["url"] == "~/.cache/gpt-pipeline/dvc-remote"
    checkpoints = [c.name for c in registry().checkpoints()]
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    assert {a["path"] for a in artifacts.values()} == {"data/prepared", "data/tokens", "artifacts/tokenizer",
                                                        "artifacts/export", *(f"artifacts/{c}" for c in checkpoints)}
    assert {a["path"] for a in artifacts.values()} <= set(declared_outs(REPO))
    for name, artifact in artifacts.items():
        kind = "dataset" if artifact["path"].startswith("data/") else "model"
        assert artifact["type"] == kind and artifact["desc"] and artifact["labels"], name
        assert all(NAME.fullmatch(word) for word in (name, *artifact["labels"])), (name, artifact["labels"])


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_run_from_the_default_remote_instead_of_retraining(micro_repo, tmp_path,
                                                                                      monkeypatch):
    """The committed default remote (`~/.cache/gpt-pipeline/dvc-remote`, one per user) with HOME in
    tmp_path: the clone that trained pushes, a second clone of it pulls with no configuration, its
    `dvc repro` reruns nothing, and the pulled checkpoints score what they scored where they were trained."""
    from pipeline.config.load import load_params
    from stages import run_stage

    home = {"HOME": str(tmp_path / "home")}
    ours = committed_copy(micro_repo, tmp_path / "ours")
    sh(ours, "dvc", "push", **home)
    assert any((tmp_path / "home" / ".cache" / "gpt-pipeline" / "dvc-remote" / "files" / "md5").iterdir())

    sh(tmp_path, "git", "clone", "-q", str(ours), "theirs")
    theirs = tmp_path / "theirs"
    assert not (theirs / "artifacts" / "pretrain").exists()
    sh(theirs, "dvc", "pull", **home)
    out = sh(theirs, "dvc", "repro", **home)
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out
    missing = [p for p in declared_outs(theirs) if not (theirs / p).exists()]
    assert not missing, missing

    # evaluate in-process in the clone (as `python -m stages.evaluate` does, without its ~10 s of imports):
    # it loads every pulled checkpoint and the reward model and must reproduce the committed table
    (theirs / "metrics" / "evaluate.json").unlink()
    monkeypatch.chdir(theirs)
    run_stage("evaluate", load_params(theirs / "params.yaml"))
    again, committed = (json.loads((repo / "metrics" / "evaluate.json").read_text()) for repo in (theirs, ours))
    # the same numbers, and each row still names the run that trained its checkpoint (the verdict's run
    # id is this evaluation's: this checkout's code, run in-process)
    del again["verdict"]["run_id"], committed["verdict"]["run_id"]
    assert again == committed


@pytest.mark.slow
def test_experiments_pushed_to_a_git_remote_show_with_their_metrics_in_another_clone(micro_repo, tmp_path):
    """Two experiments, `dvc exp run -S evaluate.max_problems=…`: the baseline's value (nothing reruns)
    and a smaller one (only evaluate and report rerun), pushed with `dvc exp push` (refs to a bare git
    remote, outputs to the default DVC remote, with HOME in tmp_path); a clone of the git remote pulls
    them with `dvc exp pull`, `dvc exp show` lists both with their params and metrics, and `dvc exp
    apply` restores one there, checkpoints included (the pulled cache)."""
    home = {"HOME": str(tmp_path / "home")}  # for the commands that reach the DVC remote
    ours = committed_copy(micro_repo, tmp_path / "ours")
    origin = str(tmp_path / "origin.git")
    sh(tmp_path, "git", "init", "-q", "--bare", origin)
    branch = sh(ours, "git", "rev-parse", "--abbrev-ref", "HEAD").strip()
    sh(ours, "git", "remote", "add", "origin", origin)
    sh(ours, "git", "push", "-q", "origin", branch)

    # the baseline first: with a clean workspace nothing reruns (the cheap way to get a second experiment)
    ran = {}
    for name, n in (("all-16", 16), ("few-4", 4)):
        log = sh(ours, "dvc", "exp", "run", "-n", name, "-S", f"evaluate.max_problems={n}")
        ran[name] = {s for s in STAGES if f"Running stage '{s}'" in log}
    assert ran == {"all-16": set(), "few-4": {"evaluate", "report"}}, ran
    sh(ours, "dvc", "exp", "push", "origin", "all-16", "few-4", **home)

    sh(tmp_path, "git", "clone", "-q", "-b", branch, origin, "theirs")
    theirs = tmp_path / "theirs"
    sh(theirs, "dvc", "exp", "pull", "origin", "all-16", "few-4", **home)
    shown = experiments(theirs)
    assert set(shown) == {"all-16", "few-4"}, sorted(shown)
    assert [shown[name]["params"]["params.yaml"]["data"]["evaluate"]["max_problems"] for name in ("all-16", "few-4")] \
        == [16, 4]
    table = {name: shown[name]["metrics"]["metrics/evaluate.json"]["data"] for name in shown}
    assert table["all-16"] == json.loads((theirs / "metrics" / "evaluate.json").read_text())  # the baseline's
    assert table["few-4"] == json.loads((ours / "metrics" / "evaluate.json").read_text())  # as run in ours
    assert table["few-4"]["sft"]["val_loss"] != table["all-16"]["sft"]["val_loss"]

    # few-4's evaluate and report ran as run-<the baseline commit>-<its config hash>, named after the experiment
    few = table["few-4"]["verdict"]["run_id"]
    assert re.fullmatch(rf"run-{sh(ours, 'git', 'rev-parse', 'HEAD')[:7]}-[0-9a-f]{{8}}", few), few
    assert few != table["all-16"]["verdict"]["run_id"]
    assert shown["few-4"]["metrics"]["metrics/report.json"]["data"]["run_id"] == few
    wandb_runs = [run_info(d) for d in (ours / "wandb").glob("offline-run-*")]
    assert sorted((r["job_type"], r["group"]) for r in wandb_runs) == [("evaluate", few), ("report", few)]
    for r in wandb_runs:
        assert r["config"]["pipeline_run"]["dvc_experiment"] == "few-4" and r["tags"] == ["dvc-exp:few-4"]

    sh(theirs, "dvc", "exp", "apply", "few-4")
    assert (theirs / "artifacts" / "aligned" / "model.safetensors").is_file()
    assert json.loads((theirs / "metrics" / "evaluate.json").read_text()) == table["few-4"]
    assert f"`{few}`" in (theirs / "reports" / "report.md").read_text().splitlines()[2]
    assert "DVC experiment `few-4`" in (theirs / "reports" / "report.md").read_text().splitlines()[2]


def test_the_run_id_names_the_commit_the_config_and_any_uncommitted_code(tmp_path, monkeypatch):
    """In a real git repo: the id is run-<commit>-<config hash>, equal for every stage of one config; an
    uncommitted edit or new file under pipeline/ or stages/ adds a hash of the change (another edit,
    another hash), a config file does not (the config hash has it); `run.id` and DVC's experiment win."""
    import pipeline.config.identity as config

    class Cfg:  # what the run identity reads of a config: its dump and run.id
        def __init__(self, d: dict) -> None:
            self.d, self.run = d, SimpleNamespace(id=d["run"]["id"])

        def to_dict(self) -> dict:
            return json.loads(json.dumps(self.d))

        def merged(self, **change) -> Cfg:
            return Cfg({**self.d, **change})

    repo = tmp_path / "repo"
    for name, text in {"pipeline/a.py": "x = 1\n", "stages/b.py": "y = 2\n", "conf/c.yaml": "z: 3\n"}.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "one")
    monkeypatch.setattr(config, "PROJECT_ROOT", repo)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    cfg = Cfg({"seed": 1, "stage": "pretrain", "run": {"id": None}})
    commit = sh(repo, "git", "rev-parse", "HEAD").strip()
    clean = config.run_identity(cfg)
    assert clean["run_id"] == f"run-{commit[:7]}-{config.config_hash(cfg)}" and clean["git_commit"] == commit
    assert not clean["git_dirty"] and clean["dvc_experiment"] is None
    assert config.run_id(cfg.merged(stage="evaluate")) == clean["run_id"]  # every stage of the run
    assert config.run_id(cfg.merged(seed=2)) != clean["run_id"]

    (repo / "conf" / "c.yaml").write_text("z: 4\n")
    assert config.run_id(cfg) == clean["run_id"]
    (repo / "pipeline" / "a.py").write_text("x = 5\n")
    edited = config.run_identity(cfg)
    assert edited["git_dirty"] and re.fullmatch(re.escape(clean["run_id"]) + r"-dirty[0-9a-f]{6}", edited["run_id"])
    (repo / "pipeline" / "a.py").write_text("x = 6\n")
    assert config.run_id(cfg) not in (clean["run_id"], edited["run_id"])
    (repo / "pipeline" / "a.py").write_text("x = 1\n")
    assert config.run_id(cfg) == clean["run_id"]
    (repo / "stages" / "new.py").write_text("w = 0\n")
    assert config.run_identity(cfg)["git_dirty"]
    (repo / "stages" / "new.py").unlink()

    monkeypatch.setenv("DVC_EXP_NAME", "lr-3e-4")
    assert config.run_identity(cfg)["dvc_experiment"] == "lr-3e-4"
    assert config.run_id(cfg.merged(run={"id": "baseline-v2"})) == "baseline-v2"


def test_lineage_follows_what_each_stage_reads_and_writes():
    """Each stage uses the registered objects its inputs lie under and makes those its outputs lie under,
    which chains data -> tokenizer -> pretrain -> sft -> reward -> aligned -> evaluation -> report."""
    from pipeline.config.root import load_config
    from pipeline.config.schema import ConfigError
    from pipeline.harness.tracking import stage_lineage

    from conftest import compose_micro, micro_config

    chain, cfg = registry(), micro_config()
    lineage = {s.name: tuple([a.name for a in side] for side in stage_lineage(chain, s.spec, cfg)) for s in chain}
    assert lineage["prepare"] == ([], ["prepared-data"])
    assert lineage["tokenizer"] == (["prepared-data"], ["tokens", "tokenizer"])
    assert lineage["pretrain"] == (["tokens", "tokenizer"], ["pretrain"])
    assert "pretrain" in lineage["sft"][0] and lineage["sft"][1] == ["sft"]
    assert {"sft", "reward"} <= set(lineage["align"][0]) and lineage["align"][1] == ["aligned"]
    assert {"pretrain", "sft", "sft_control", "aligned", "reward"} <= set(lineage["evaluate"][0])
    assert lineage["evaluate"][1] == ["evaluation"] and lineage["report"] == (["evaluation"], ["report"])
    assert "reward" not in lineage_of(chain, "align", "align=dpo", "align.eval_every=0")  # DPO reads no reward model
    assert "reward" in lineage_of(chain, "align", "align=dpo", "align.eval_every=5")  # but its monitor scores with it
    with pytest.raises(ConfigError, match="logger.wandb.artifacts 'copy' is unknown: choose one of reference, files, "
                                          "none"):
        load_config(compose_micro("logger=wandb", "logger.wandb.artifacts=copy"))


def lineage_of(chain, stage: str, *overrides: str) -> list[str]:
    from pipeline.harness.tracking import stage_lineage

    from conftest import micro_config
    return [a.name for a in stage_lineage(chain, chain[stage].spec, micro_config(*overrides))[0]]


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.slow
def test_wandb_files_record_the_lineage_from_data_to_the_aligned_model(micro_repo):
    """Read back from the offline run files with wandb's own protobufs: each object was logged once, by the
    stage that made it, holding the MD5 of each of its files as DVC has them; each stage logged the use
    of exactly the versions (digests) its inputs were made with; and following the uses back from the
    aligned model reaches the prepared data through the reward model, SFT, pretraining and the tokenizer.
    Every artifact, W&B run, metrics file, checkpoint and the report carry the same run id and commit."""
    runs = [run_info(d) for d in sorted((micro_repo / "wandb").glob("offline-run-*"))]
    runs = {r["job_type"]: r for r in runs if r["made"]}  # a killed run's directory has no artifact records
    made = {a["name"]: (stage, a) for stage, r in runs.items() for a in r["made"]
            if "table" not in a["name"] and a["type"] != "run_table"}  # W&B's own tables (align's completions)
    assert sorted(made) == sorted(["prepared-data", "tokens", "tokenizer", "pretrain", "sft", "reward", "aligned",
                                   "sft_control", "export", "evaluation", "report"])
    for name in ("tokenizer", "pretrain", "sft", "reward", "aligned"):
        stage, artifact = made[name]
        folder = micro_repo / "artifacts" / name
        assert artifact["files"] == {p.name: md5_b64(p) for p in folder.iterdir()}, name

    def inputs(name: str) -> set[str]:
        stage, _ = made[name]
        for used in runs[stage]["used"]:  # the use points at the very version its producer logged
            assert used["digest"] == made[used["name"]][1]["digest"], (stage, used["name"])
        return {u["name"] for u in runs[stage]["used"]}

    assert inputs("aligned") >= {"sft", "reward"}
    assert inputs("reward") >= {"sft"} and inputs("sft") >= {"pretrain"}
    assert inputs("pretrain") == {"tokenizer", "tokens"} and inputs("tokenizer") == {"prepared-data"}
    assert inputs("prepared-data") == set() and made["prepared-data"][0] == "prepare"
    assert inputs("report") == {"evaluation"} and "aligned" in inputs("evaluation")

    run_id = json.loads((micro_repo / "metrics" / "report.json").read_text())["run_id"]
    commit = sh(micro_repo, "git", "rev-parse", "HEAD").strip()
    assert re.fullmatch(rf"run-{commit[:7]}-[0-9a-f]{{8}}", run_id), run_id
    for stage, r in runs.items():
        assert r["group"] == run_id and r["config"]["pipeline_run"]["git_commit"] == commit, stage
        for artifact in r["made"]:
            if "table" not in artifact["name"] and artifact["type"] != "run_table":
                assert run_id in artifact["aliases"] and artifact["metadata"]["git_commit"] == commit
    for stage in STAGES[:-1]:
        metrics = json.loads((micro_repo / "metrics" / f"{stage}.json").read_text())
        assert (metrics["verdict"] if stage == "evaluate" else metrics)["run_id"] == run_id, stage
    for name in ("pretrain", "sft", "reward", "aligned", "sft_control"):
        meta = json.loads((micro_repo / "artifacts" / name / "meta.json").read_text())
        assert (meta["run_id"], meta["git_commit"], meta["git_dirty"]) == (run_id, commit, False), name
    header = (micro_repo / "reports" / "report.md").read_text().splitlines()[2]
    assert f"`{run_id}`, git commit `{commit[:12]}`" in header, header


def test_a_use_recorded_by_reference_has_the_digest_of_an_uploaded_copy(tmp_path, monkeypatch):
    """With `logger.wandb.artifacts=files` the producer uploads copies while consumers record their use by
    reference (no copy): W&B resolves a use by digest, so both kinds must give the same one, and any
    changed byte another."""
    from pipeline.harness.tracking import build_artifact
    from pipeline.registry import Artifact

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where copies are staged
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "ckpt" / "meta.json").write_text('{"kind": "gpt"}')
    spec = Artifact("sft", "ckpt", "model", "a checkpoint")
    uploaded, referenced = (build_artifact(spec, mode).manifest for mode in ("files", "reference"))
    assert uploaded.digest() == referenced.digest()
    assert {e.ref for e in referenced.entries.values()} == {(tmp_path / "ckpt" / n).as_uri()
                                                           for n in ("model.safetensors", "meta.json")}
    (tmp_path / "ckpt" / "meta.json").write_text('{"kind": "reward"}')
    assert build_artifact(spec, "reference").manifest.digest() != referenced.digest()
