"""Generated input-file fuzzing: every file a stage reads, damaged in each way files get damaged, stops the stage
before any work with a message naming the file (and the line), or, where the damage is harmless, is read exactly
as the clean file.

The cases are FILES x CORRUPTIONS, less the combinations that mean nothing (SKIPPED below). Each breaks one file
of one copy of the micro chain (`workspace`: copied once per module, and every file put back after each case),
runs the stage that reads the file as users do (`stages.main(name)` in-process, the entry point of
`python -m stages.<name>`; a few cases as real subprocesses) and asserts, for a refusal: exit code 2, a message
naming the file (and the line where there is one) and what is wrong, no traceback, the stage's `run` never entered,
within about a second; and every file of the workspace (and of the transformers directory) byte-identical before
and after (SHA-256 of each file, the stage's log file aside): no metrics file, checkpoint, curve or temporary
directory written, nothing earlier touched. For an acceptance: the stage runs and writes what it writes from the
clean file (the micro chain's own outputs, or a clean run's for the transformers directory: the runs are
deterministic), every other file untouched.

Accepted rather than refused: a byte order mark and CRLF line ends in a JSON Lines split (an editor adds either;
the split's two readers, `load_split` and `datasets`, read past both to exactly the rows of the clean file), and
CRLF in a JSON document (JSON whitespace to every parser) except the workspace's tokenizer.json, whose bytes are
its identity (checkpoints record their SHA-256): there CRLF makes another tokenizer, refused as one. A BOM in a
JSON document is refused: the `tokenizers` parser and transformers refuse it too, so accepting it would only move
the failure later.

How each corruption is made, where it is not obvious: `truncated` cuts a split at a line end (every line left
parses: only the manifest's row count tells) and any other file in the middle; `flipped` inverts three bytes
(a quarter, half and three quarters in), inside the header of a safetensors file and on the high byte of a token
id in a shard; `long_line` is a row whose main text is 10 MB in a split, a 10 MB line of junk in a JSON document;
`wrong_type` is JSON of another type where an object is read (a row, a document, a safetensors header);
`wrong_field` one field of another type; `wrong_kind` a well-formed file of the wrong kind or shape (another
split's rows, another of the pipeline's JSON files for the manifest, a reward checkpoint's meta.json for a language
model's, a tensor of another shape, the other split's shard index, uint32 ids, another tokenizer, a config.json
of another shape).

Skipped combinations, and why:
- a token shard (.bin) x bad_utf8, bom, crlf, long_line, wrong_type, wrong_field: raw token ids, no text, no lines
  and no JSON in it.
- a safetensors file x bad_utf8, bom, crlf, long_line: binary; its only text is its JSON header, whose damage
  `flipped`, `wrong_type` and `wrong_field` make.
- pretrain.jsonl x long_line: a 10 MB document is data, not damage (pretraining draws windows from one stream).
- bytes flipped where nothing can see it: in a safetensors file's tensor data and to an id still in the
  vocabulary in a shard (neither format has a checksum; DVC's hashes in dvc.lock cover them).

Marked slow (run by `make test-all` and CI): the cases of the transformers directory (`model.init_from=hf:DIR`, a tiny
random Llama with its chat template saved with save_pretrained: building it costs transformers' import), the
subprocesses that import torch, and the accepted damages that rerun reward, align, pretrain, or sft a second
time. In the default tier a refusal takes about 0.1 s; its accepted cases rerun sft, evaluate and the tokenizer
stage (about a second each).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stages import registry

from conftest import REPO, compose_micro, venv_env

TEN_MB = 10 * 2**20
BOM = b"\xef\xbb\xbf"
IGNORED = ("outputs/logs", "params.yaml")  # the stage's own log file; the config each case writes


# ------------------------------------------------------------------ the files a stage reads

@dataclass(frozen=True)
class Target:
    """A file a stage reads: where it is, the stage that reads it, its form, the field damage goes into."""

    id: str
    path: str              # in the workspace; in the transformers directory when `hf`
    stage: str
    form: str              # jsonl | json | tokenizer | safetensors | shard
    field: str = ""        # the field `wrong_field` changes (and, in a split, the one a 10 MB line fills)
    hf: bool = False


FILES = [
    Target("sft_split", "data/prepared/sft.jsonl", "sft", "jsonl", "messages"),
    Target("preference_split", "data/prepared/preference.jsonl", "reward", "jsonl", "prompt"),
    Target("rl_prompts_split", "data/prepared/rl_prompts.jsonl", "align", "jsonl", "prompt"),
    Target("eval_split", "data/prepared/eval.jsonl", "evaluate", "jsonl", "prompt"),
    Target("pretrain_split", "data/prepared/pretrain.jsonl", "tokenizer", "jsonl", "text"),
    Target("manifest", "data/prepared/manifest.json", "evaluate", "json", "counts"),
    Target("tokenizer", "artifacts/tokenizer/tokenizer.json", "sft", "tokenizer", "model"),
    Target("meta", "artifacts/pretrain/meta.json", "sft", "json", "model"),
    Target("weights", "artifacts/pretrain/model.safetensors", "sft", "safetensors"),
    Target("shard_index", "data/tokens/pretrain.json", "pretrain", "json", "shards"),
    Target("shard", "data/tokens/pretrain_000.bin", "pretrain", "shard"),
    Target("hf_config", "config.json", "tokenizer", "json", "num_hidden_layers", hf=True),
    Target("hf_weights", "model.safetensors", "tokenizer", "safetensors", hf=True),
    Target("hf_tokenizer", "tokenizer.json", "tokenizer", "tokenizer", "model", hf=True),
]
CORRUPTIONS = ("truncated", "flipped", "bad_utf8", "bom", "crlf", "long_line", "empty", "wrong_type", "wrong_field",
               "wrong_kind", "symlink_loop")
TEXT_ONLY = {"bad_utf8", "bom", "crlf", "long_line"}
SKIPPED: dict[tuple[str, str], str] = {
    **{("shard", c): "raw token ids: no text, lines or JSON" for c in (*TEXT_ONLY, "wrong_type", "wrong_field")},
    **{("safetensors", c): "binary: its header's damage is flipped/wrong_type/wrong_field" for c in TEXT_ONLY},
    ("pretrain_split", "long_line"): "a 10 MB document is data, not damage",
}


def skipped(target: Target, corruption: str) -> str | None:
    return SKIPPED.get((target.form, corruption)) or SKIPPED.get((target.id, corruption))


# ------------------------------------------------------------------ ways to damage a file
# Each takes the file (and its Target) and returns the line a message must name (None where there is none).

def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def middle(rows: list[bytes]) -> int:
    """The index of the middle line that holds a JSON string (a line to damage inside)."""
    return next(i for i in range(len(rows) // 2, len(rows)) if b'"' in rows[i])


def line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def header_span(data: bytes) -> tuple[int, int]:
    """Where a safetensors file's JSON header lies (after its 8-byte little-endian length)."""
    return 8, 8 + int.from_bytes(data[:8], "little")


def rewrite_header(path: Path, change: Callable[[dict], object]) -> None:
    data = path.read_bytes()
    start, end = header_span(data)
    header = json.dumps(change(json.loads(data[start:end]))).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[end:])


def truncated(path: Path, t: Target) -> int | None:
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) // 2) + 1 if t.form == "jsonl" else len(data) // 2
    path.write_bytes(data[:cut])
    return None


def flipped(path: Path, t: Target) -> int | None:
    data = bytearray(path.read_bytes())
    start, end = header_span(data) if t.form == "safetensors" else (0, len(data))
    offsets = [start + (end - start) * k // 4 for k in (1, 2, 3)]
    if t.form == "shard":
        offsets = [o | 1 for o in offsets]  # the high byte of a little-endian uint16 id: far past the vocabulary
    for o in offsets:
        data[o] ^= 0xFF
    path.write_bytes(bytes(data))
    return offsets[0] // 2 if t.form == "shard" else line_of(data, offsets[0])  # a shard: the token, not a line


def bad_utf8(path: Path, t: Target) -> int:
    rows = lines(path)
    i = middle(rows)
    j = rows[i].index(b'"') + 1
    rows[i] = rows[i][:j] + b"\xc3\x28" + rows[i][j:]  # 0xc3 opens a two-byte character that "(" cannot end
    path.write_bytes(b"".join(rows))
    return i + 1


def bom(path: Path, t: Target) -> None:
    path.write_bytes(BOM + path.read_bytes())


def crlf(path: Path, t: Target) -> None:
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))


def long_line(path: Path, t: Target) -> int:
    rows = lines(path)
    if t.form == "jsonl":  # a row whose main text is 10 MB, valid JSON, among the first rows every reader reads
        i = 2
        row = json.loads(rows[i])
        text = "many words " * (TEN_MB // 11)
        if t.field == "messages":
            row["messages"][-1]["content"] = text
        else:
            row[t.field] = text
        rows[i] = json.dumps(row).encode() + b"\n"
    else:  # a JSON document: a 10 MB line of junk after its first line
        i = 1
        rows.insert(1, b"x" * TEN_MB + b"\n")
    path.write_bytes(b"".join(rows))
    return i + 1


def empty(path: Path, t: Target) -> None:
    path.write_bytes(b"")


def wrong_type(path: Path, t: Target) -> int | None:
    if t.form == "jsonl":
        rows = lines(path)
        i = middle(rows)
        rows[i] = b"[1, 2, 3]\n"
        path.write_bytes(b"".join(rows))
        return i + 1
    if t.form == "safetensors":
        rewrite_header(path, lambda header: list(header))
        return None
    path.write_text(json.dumps(list(json.loads(path.read_bytes()))) + "\n")  # the object's keys, as an array
    return None


def wrong_field(path: Path, t: Target) -> int | None:
    if t.form == "jsonl":
        rows = lines(path)
        i = middle(rows)
        row = json.loads(rows[i])
        row[t.field] = "a string" if t.field == "messages" else 42
        rows[i] = json.dumps(row).encode() + b"\n"
        path.write_bytes(b"".join(rows))
        return i + 1
    if t.form == "safetensors":
        def shape_as_text(header: dict) -> dict:
            name = next(k for k in header if k != "__metadata__")
            header[name]["shape"] = str(header[name]["shape"])
            return header
        rewrite_header(path, shape_as_text)
        return None
    doc = json.loads(path.read_bytes())
    doc[t.field] = "micro" if isinstance(doc[t.field], (dict, list, int)) else 2
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return None


def wrong_kind(path: Path, t: Target) -> int | None:
    """A well-formed file of the wrong kind or shape in this one's place."""
    prepared = Path("data/prepared")
    other = {"sft_split": "preference.jsonl", "preference_split": "eval.jsonl", "rl_prompts_split": "sft.jsonl",
             "eval_split": "sft.jsonl", "pretrain_split": "sft.jsonl"}
    if t.id in other:
        shutil.copyfile(prepared / other[t.id], path)
        return 1
    if t.id == "manifest":
        shutil.copyfile("data/tokens/pretrain.json", path)  # another of the pipeline's JSON files
    elif t.id == "meta":
        shutil.copyfile("artifacts/reward/meta.json", path)
    elif t.id == "shard_index":
        shutil.copyfile("data/tokens/pretrain_val.json", path)
    elif t.id == "shard":
        import numpy as np
        np.fromfile(path, dtype=np.uint16).astype(np.uint32).tofile(path)
    elif t.id == "hf_tokenizer":  # the workspace's own BPE: none of the chat template's tokens
        shutil.copyfile("artifacts/tokenizer/tokenizer.json", path)
    elif t.id == "tokenizer":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(path))
        tok.add_tokens(["an extra token"])
        tok.save(str(path))
    elif t.id == "hf_config":
        config = json.loads(path.read_bytes())
        config["intermediate_size"] += 16  # the weights are no longer this model's
        path.write_text(json.dumps(config, indent=2) + "\n")
    elif t.form == "safetensors":
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(path))
        name = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
        tensors[name] = tensors[name][:-1].clone()  # one row short
        save_file(tensors, str(path), metadata={"format": "pt"})
    return None


def symlink_loop(path: Path, t: Target) -> None:
    path.unlink()
    os.symlink(path.name, path)  # the link names itself


DAMAGE: dict[str, Callable[[Path, Target], int | None]] = {c: globals()[c] for c in CORRUPTIONS}


# ------------------------------------------------------------------ what each case expects

ACCEPTED = {("jsonl", "bom"), ("jsonl", "crlf"), ("json", "crlf"), ("hf_tokenizer", "crlf")}


def accepted(t: Target, corruption: str) -> bool:
    return (t.form, corruption) in ACCEPTED or (t.id, corruption) in ACCEPTED


def what_is_wrong(t: Target, corruption: str, at: int | None) -> list[str]:
    """Patterns the refusal must match besides the file's name: the line (`file:line` in a split, `line N` in a
    JSON document) where there is one, and what is wrong, in the words users would search for."""
    where = {"jsonl": f"{re.escape(t.path)}:{at}:", "json": rf"line {at}\b", "tokenizer": rf"line {at}\b"}
    patterns = [where[t.form]] if at is not None and t.form in where else []
    if t.form == "shard" and corruption == "flipped":
        patterns.append(rf"token {at} is id \d+, outside the tokenizer's")
    words = {"symlink_loop": "symbolic link loop", "bad_utf8": "not UTF-8", "bom": "byte order mark",
             "empty": "is empty|has no rows|is 0 bytes"}
    if corruption in words:
        patterns.append(words[corruption])
    return patterns


@dataclass(frozen=True)
class Case:
    target: Target
    corruption: str
    subprocess: bool = False

    @property
    def id(self) -> str:
        return f"{self.target.id}-{self.corruption}" + ("-subprocess" if self.subprocess else "")


SUBPROCESS = {("pretrain_split", "flipped"), ("tokenizer", "symlink_loop"), ("weights", "truncated")}
CASES = [Case(t, c) for t in FILES for c in CORRUPTIONS if not skipped(t, c)]
CASES += [Case(c.target, c.corruption, subprocess=True) for c in CASES if (c.target.id, c.corruption) in SUBPROCESS]


def marks(case: Case) -> list:
    """Slow: the transformers directory (transformers' import), the subprocesses that import torch, and the accepted
    damages that rerun a training stage other than sft (one to two seconds each)."""
    t = case.target
    reruns = accepted(t, case.corruption) and (t.stage not in ("sft", "evaluate", "tokenizer") or t.id == "meta")
    return [pytest.mark.slow] if t.hf or (case.subprocess and t.stage != "tokenizer") or reruns else []


# ------------------------------------------------------------------ one workspace for every case

def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under `root` (its bytes) and every symbolic link (its target, as a str), but IGNORED."""
    out: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(top) / name
            rel = path.relative_to(root).as_posix()
            if rel.startswith(IGNORED):
                continue
            if path.is_symlink():
                out[rel] = os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


def directories(root: Path) -> set[Path]:
    """Every directory under `root` (not a link to one), but IGNORED."""
    found = {Path(top) / name for top, dirs, _ in os.walk(root) for name in dirs}
    return {d for d in found if not d.is_symlink() and not d.relative_to(root).as_posix().startswith(IGNORED)}


def digests(root: Path) -> dict[str, str]:
    return {rel: f"-> {v}" if isinstance(v, str) else hashlib.sha256(v).hexdigest() for rel, v in tree(root).items()}


class Workspace:
    """The micro chain's copy the cases break, and what to put back after each."""

    def __init__(self, root: Path) -> None:
        self.root, self.pristine, self.dirs = root, {root: tree(root)}, directories(root)
        self.params: tuple[str, ...] | None = None
        self.clean: dict[tuple[str, ...], dict[str, bytes | str]] = {(): self.pristine[root]}
        """What each config's stages write from clean inputs: the micro chain's own files, and (added) others."""

    def add(self, directory: Path) -> None:
        self.pristine[directory] = tree(directory)
        self.dirs |= directories(directory)

    def snapshot(self) -> dict[str, str]:
        return {f"{root.name}/{rel}": d for root in self.pristine for rel, d in digests(root).items()}

    def write_params(self, *overrides: str) -> None:
        if overrides != self.params or not (self.root / "params.yaml").is_file():
            OmegaConf.save(compose_micro(*overrides), self.root / "params.yaml")
            self.params = overrides

    def restore(self) -> None:
        """Every file back as it was, everything new removed."""
        for root, files in self.pristine.items():
            now = tree(root)
            for rel in set(now) - set(files):
                (root / rel).unlink()
            for rel, content in files.items():
                if now.get(rel) != content:
                    path = root / rel
                    if path.is_symlink() or path.is_file():
                        path.unlink()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(content, str):
                        os.symlink(content, path)
                    else:
                        path.write_bytes(content)
            for path in sorted(directories(root) - self.dirs, reverse=True):  # a stage's, emptied above
                path.rmdir()


@pytest.fixture(scope="module")
def workspace(micro_chain: Path, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("fuzz") / "work"
    shutil.copytree(micro_chain, root, ignore=shutil.ignore_patterns("wandb"), symlinks=True)
    return Workspace(root)


@pytest.fixture(scope="module")
def hf_dir(workspace: Workspace) -> Path:
    """A tiny random Llama with its own chat template, saved as transformers saves it (no download); the tokenizer
    stage's outputs from it, clean, are what an accepted damage must give."""
    pytest.importorskip("transformers")
    from stages import run_stage

    from byom import tiny_llama_dir
    corpus = (workspace.root / "data/prepared/pretrain.jsonl").read_text().splitlines()
    path = tiny_llama_dir(workspace.root.parent / "hf", [json.loads(line)["text"] for line in corpus])
    workspace.add(path)
    old = Path.cwd()
    os.chdir(workspace.root)
    try:
        run_stage("tokenizer", compose_micro(f"model.init_from=hf:{path}"))
        workspace.clean[f"model.init_from=hf:{path}",] = tree(workspace.root)
    finally:
        workspace.restore()
        os.chdir(old)
    return path


@pytest.fixture
def ws(workspace: Workspace, monkeypatch) -> Workspace:
    monkeypatch.chdir(workspace.root)
    yield workspace
    workspace.restore()


# ------------------------------------------------------------------ running a stage as users do

@dataclass
class Outcome:
    code: int | str | None
    out: str
    seconds: float
    ran: bool


def run(stage: str, in_subprocess: bool, capsys, monkeypatch) -> Outcome:
    start = time.perf_counter()
    if in_subprocess:
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], capture_output=True, text=True,
                              env=venv_env(PYTHONPATH=str(REPO)), timeout=300)
        return Outcome(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start, ran=False)
    from stages import main

    module, entered = registry()[stage].module, []
    real_run = module.run

    def spy(*args, **kwargs):
        entered.append(True)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(module, "run", spy)
    code: int | str | None = 0
    try:
        main(stage)
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # what users would see as a traceback
        import traceback
        captured = capsys.readouterr()
        return Outcome(f"exception {type(err).__name__}", captured.out + captured.err + "Traceback (most recent "
                       "call last):\n" + traceback.format_exc(), time.perf_counter() - start, bool(entered))
    captured = capsys.readouterr()
    return Outcome(code, captured.out + captured.err, time.perf_counter() - start, bool(entered))


def shown(t: Target, hf: Path | None) -> str:
    """The file's path as a message prints it."""
    return str(hf / t.path) if t.hf else t.path


VOLATILE = re.compile(r"time|per_sec|_s$|_s_|share$|run_id|created")


def steady(value):
    """`value` (a metrics or meta.json object) without what changes from run to run (timings, the time written)."""
    if isinstance(value, dict):
        return {k: steady(v) for k, v in value.items() if not VOLATILE.search(k)}
    return value


def assert_refused(case: Case, o: Outcome, path: str, at: int | None, before: dict, after: dict) -> None:
    t = case.target
    assert o.code == 2, f"{case.id}: exit code {o.code}, expected 2 (a refusal):\n{o.out[-3000:]}"
    assert "Traceback" not in o.out, f"{case.id}: a traceback:\n{o.out[-3000:]}"
    assert f"error in stage {t.stage!r}" in o.out and path in o.out, f"{case.id}: {path} not named in:\n{o.out}"
    for pattern in what_is_wrong(t, case.corruption, at):
        assert re.search(pattern, o.out), f"{case.id}: no {pattern!r} in:\n{o.out}"
    assert len(o.out) < 20_000, f"{case.id}: a message of {len(o.out)} characters (the 10 MB line echoed?)"
    assert not o.ran, f"{case.id}: refused only after the stage's run began"
    if not case.subprocess:
        assert o.seconds < 2.0, f"{case.id}: {o.seconds:.1f} s to refuse"
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{case.id}: files written or changed by a refused stage: {changed}"


def assert_same_as_clean(case: Case, o: Outcome, ws: Workspace, before: dict, after: dict) -> None:
    """The stage read the damaged file as the clean one: what it wrote is what the micro chain's run wrote."""
    assert o.code in (0, None), f"{case.id}: exit code {o.code}:\n{o.out[-3000:]}"
    assert "Traceback" not in o.out and o.ran
    spec = registry()[case.target.stage].spec
    made = [str(p) for p in (*spec.made(), Path("outputs"))]
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    outside = [k for k in changed if not any(k == f"{ws.root.name}/{m}" or k.startswith(f"{ws.root.name}/{m}/")
                                             for m in made)]
    assert not outside, f"{case.id}: files outside the stage's outputs changed: {outside}"
    clean = ws.clean[ws.params]
    for rel in (k.split("/", 1)[1] for k in changed if k.startswith(f"{ws.root.name}/")):
        if rel.startswith(("outputs/", "dvclive/")) or rel not in clean:  # resume state, curves of timings
            continue
        new = (ws.root / rel).read_bytes()
        if rel.endswith(".json"):
            assert steady(json.loads(new)) == steady(json.loads(clean[rel])), f"{case.id}: {rel} differs"
        else:
            assert new == clean[rel], f"{case.id}: {rel} differs from the clean run's"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=marks(c)) for c in CASES])
def test_damaged_input_file(case: Case, ws: Workspace, request, capsys, monkeypatch) -> None:
    t = case.target
    hf = request.getfixturevalue("hf_dir") if t.hf else None
    ws.write_params(*((f"model.init_from=hf:{hf}",) if hf else ()))
    path = (hf / t.path) if hf else ws.root / t.path
    at = DAMAGE[case.corruption](path, t)
    before = ws.snapshot()
    o = run(t.stage, case.subprocess, capsys, monkeypatch)
    after = ws.snapshot()
    if accepted(t, case.corruption):
        assert_same_as_clean(case, o, ws, before, after)
    else:
        assert_refused(case, o, shown(t, hf), at, before, after)


def test_the_cases_cover_every_file_and_corruption() -> None:
    assert len(CASES) >= 40
    assert {c.target.id for c in CASES} == {t.id for t in FILES}
    assert {c.corruption for c in CASES} == set(CORRUPTIONS)


# ------------------------------------------------------------------ a symbolic link loop under data/prepared

@pytest.mark.parametrize("in_subprocess", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_link_loop_under_the_prepared_data_is_refused_before_evaluate_works(ws: Workspace, capsys, monkeypatch,
                                                                               in_subprocess: bool) -> None:
    """Evaluate reads named files of data/prepared only, but W&B's lineage (and DVC) walk the directory: a loop
    there once let evaluate do all of its work and write its metrics, then exit 1 from the lineage code."""
    ws.write_params("logger=wandb")
    os.symlink("loop", "data/prepared/loop")
    before = ws.snapshot()
    o = run("evaluate", in_subprocess, capsys, monkeypatch)
    assert_refused(Case(FILES[3], "symlink_loop", in_subprocess), o, "data/prepared/loop", None, before,
                   ws.snapshot())


@pytest.mark.slow
def test_the_lineage_never_fails_a_finished_stage(ws: Workspace, capsys, monkeypatch) -> None:
    """A link loop that appears under data/prepared while evaluate works: the stage finishes, its metrics are
    written, and the lineage leaves the directory it cannot walk out with a warning naming it."""
    ws.write_params("logger=wandb")
    module = registry()["evaluate"].module
    real_run = module.run

    def run_then_loop(cfg, spec):
        metrics = real_run(cfg, spec)
        os.symlink("loop", "data/prepared/loop")
        return metrics

    monkeypatch.setattr(module, "run", run_then_loop)
    from stages import main
    main("evaluate")
    err = capsys.readouterr().err
    assert "W&B lineage of evaluate: prepared-data (data/prepared) not recorded" in err and "loop" in err
    assert steady(json.loads(Path("metrics/evaluate.json").read_text())) == steady(
        json.loads(ws.pristine[ws.root]["metrics/evaluate.json"]))
