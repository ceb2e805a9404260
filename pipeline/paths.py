"""Every on-disk location the pipeline reads or writes, in one place.

Paths DVC tracks are relative to the working directory (the project root under `dvc repro`, a job's
directory in a Hydra multirun, a temp directory in the tests), so a stage never writes outside the
directory it runs in. Paths of the project's own files (conf/, params.yaml, dvc.yaml) are absolute.
The `gpt-pipeline` CLI may be started anywhere inside a workspace: it moves to `workspace_root()` first, and
paths the user types are rebased on that root (`user_path`) before it does.
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
DVC_FILE = PROJECT_ROOT / "dvc.yaml"
PARAMS_FILE = Path("params.yaml")  # the config `dvc repro` reads, in the working directory
CODE_DIRS = ("pipeline", "stages")  # the project's code: what a run identity hashes, what stages import
HF_HOME = PROJECT_ROOT / ".cache" / "huggingface"  # a project-local hub cache (never ~/.cache)

WORKSPACE_MARKERS = ("dvc.yaml", "params.yaml")  # what the directory these relative paths start from holds

PREPARED = Path("data/prepared")  # the prepare stage's splits and manifest
MANIFEST = PREPARED / "manifest.json"
TOKENS = Path("data/tokens")  # the tokenizer stage's token shards
ARTIFACTS = Path("artifacts")  # checkpoints, one directory per name, the tokenizer and the export
TOKENIZER_DIR = ARTIFACTS / "tokenizer"
TOKENIZER_FILE = TOKENIZER_DIR / "tokenizer.json"
# beside it when the tokenizer stage adopted a checkpoint's chat template (pipeline/data/chat_template.py)
CHAT_TEMPLATE_FILE = TOKENIZER_DIR / "chat_template.jinja"
CHAT_TOKENS_FILE = TOKENIZER_DIR / "chat_tokens.json"
EXPORT_DIR = ARTIFACTS / "export"
METRICS = Path("metrics")  # metrics/<stage>.json, small and kept in git
LIVE = Path("dvclive")  # dvclive/<stage>/: DVCLive's files of each training stage (its curves: DVC plots)
REPORTS = Path("reports")
OUTPUTS = Path("outputs")  # never tracked by DVC: resume checkpoints, Lightning's and Hydra's run directories
RESUME_ROOT = OUTPUTS / "resume"

# the small files whose bytes identify a large input (a resumed run must see the same inputs)
IDENTITY_FILES: dict[Path, tuple[Path, ...]] = {
    PREPARED: (MANIFEST,),  # holds the SHA-256 of every split file
    TOKENS: (TOKENS / "pretrain.json", TOKENS / "pretrain_val.json"),  # counts and the tokenizer's hash
    TOKENIZER_DIR: (TOKENIZER_FILE, CHAT_TEMPLATE_FILE, CHAT_TOKENS_FILE),  # absent files are skipped
}


def workspace_root(start: Path | None = None) -> Path:
    """The workspace a command started in `start` (default: the working directory) works in: the nearest of it and
    its parents holding dvc.yaml or params.yaml; `start` itself when none does (a bare copy of artifacts/)."""
    start = (start or Path.cwd()).absolute()
    return next((d for d in (start, *start.parents) if any((d / m).is_file() for m in WORKSPACE_MARKERS)), start)


def user_path(text: str) -> Path:
    """A path typed on the command line, meaning the same once the CLI has moved to `workspace_root()`: relative
    to the root when inside it, else absolute (argparse `type=`; a default that is a Path, not a string, is left
    as it is: workspace-relative)."""
    path, root = Path(text).expanduser().absolute(), workspace_root()
    return path.relative_to(root) if path.is_relative_to(root) else path


def checkpoint_dir(name: str) -> Path:
    """`artifacts/<name>`: checkpoint `name` (meta.json + model.safetensors)."""
    return ARTIFACTS / name


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def live_dir(stage: str) -> Path:
    """`dvclive/<stage>`: metrics.json (the latest value of each scalar) and plots/metrics/<name>.tsv (every
    logged value: columns step and the name's last part), written by DVCLive as the stage trains."""
    return LIVE / stage


def live_metric(stage: str, name: str) -> Path:
    """The step file of scalar `name` (e.g. train/loss) of training stage `stage`."""
    return live_dir(stage) / "plots" / "metrics" / f"{name}.tsv"


def resume_dir(stage: str) -> Path:
    return RESUME_ROOT / stage


def lightning_dir(stage: str) -> Path:
    return OUTPUTS / "lightning" / stage
