"""Bad config and bad inputs stop a stage before it does any work (pipeline/config, pipeline/harness/validation.py).

Each case copies the micro chain (every stage already ran there), writes params.yaml from the micro
config plus its overrides, removes the outputs of the stage it runs, breaks one thing and runs the stage
the way users do: `stages.main(stage)` in-process (the entry point of `python -m stages.<name>`),
or, for a few cases that fail before any heavy import, a real `python -m stages.<name>` subprocess.
Each asserts a non-zero exit, a message naming its culprit (field, or file and line) and that none of
the stage's outputs (checkpoint, metrics, curves, temporary directories) is left behind.
"""
from __future__ import annotations

import json
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

from pipeline.paths import resume_dir
from stages import registry

from conftest import REPO, compose_micro, venv_env

SFT = Path("data/prepared/sft.jsonl")
TOKENIZER = Path("artifacts/tokenizer/tokenizer.json")


def outputs(stage: str) -> list[Path]:
    """Everything the stage's spec says it writes, and its resume directory."""
    return [*registry()[stage].spec.made(), resume_dir(stage)]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------ ways to break a working directory

def edit_line(path: Path, line: int, change: Callable[[str], str]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = change(lines[line - 1])
    path.write_text("".join(lines))


def drop_field(name: str) -> Callable[[str], str]:
    def change(line: str) -> str:
        row = json.loads(line)
        del row[name]
        return json.dumps(row) + "\n"
    return change


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def put_reward_in_place_of_sft() -> None:
    shutil.rmtree("artifacts/sft")
    shutil.copytree("artifacts/reward", "artifacts/sft")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def lengthen_reply(line: str) -> str:
    """The conversation on `line` with a reply far longer than the micro model's 128-token context."""
    row = json.loads(line)
    row["messages"][-1]["content"] = "many words " * 100
    return json.dumps(row) + "\n"


def set_cfg(key: str, value) -> Callable:
    return lambda cfg: OmegaConf.update(cfg, key, value, force_add=True)


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    culprits: tuple[str, ...]              # substrings (or `re:` patterns) the message must contain
    overrides: tuple[str, ...] = ()        # Hydra overrides of the micro config
    edit_cfg: Callable | None = None       # a change Hydra's override syntax cannot express
    break_it: Callable[[], None] | None = None
    subprocess: bool = False


CASES = [
    # ---- config fields
    Case("n_embd_not_divisible_by_n_head", "pretrain",
         ("model.n_embd (32) must be divisible by model.n_head (3)", "divisor"), ("model.n_head=3",)),
    Case("gpu_on_a_machine_without_one", "pretrain", ("trainer.accelerator=gpu but this machine has no CUDA device",
                                                      "trainer=cpu"), ("trainer=gpu",)),
    Case("negative_devices", "sft", ("trainer.devices is -3: it must be an integer >= 1, auto or a list",),
         ("trainer.devices=-3",)),
    Case("negative_seed", "pretrain", ("seed is -1: it must be in [0, 4294967295]",), ("seed=-1",)),
    Case("yaml_syntax_error_in_params", "report", ("params.yaml:2:6: not valid YAML", "make params"),
         break_it=lambda: Path("params.yaml").write_text("seed: 1\nrun: : x\n"), subprocess=True),
    Case("min_lr_ratio_named_not_lr", "sft", ("sft.optim.min_lr_ratio is -1: it must be in [0, 1]",),
         ("sft.optim.min_lr_ratio=-1",)),
    Case("zero_batch_size", "sft", ("sft.batch_size is 0: it must be >= 1",), ("sft.batch_size=0",)),
    Case("misspelt_key", "sft", ("sft.max_stepz is not a setting of sft: did you mean sft.max_steps?",),
         ("+sft.max_stepz=10",)),
    Case("negative_lr", "pretrain", ("pretrain.optim.lr is -0.001", "positive"), ("pretrain.optim.lr=-0.001",)),
    Case("dropout_of_one", "pretrain", ("model.dropout is 1.0", "[0, 1)"), ("model.dropout=1.0",)),
    Case("zero_max_steps", "reward", ("reward.max_steps is 0",), ("reward.max_steps=0",)),
    Case("unknown_strategy", "sft", ("strategy.name 'zero'", "conf/strategy/"), ("strategy.name=zero",)),
    Case("unknown_precision", "pretrain", ("trainer.precision '8-true'", "bf16-mixed"), ("trainer.precision=8-true",)),
    Case("answer_budget_over_block_size", "evaluate", ("evaluate.max_new_tokens (126)", "model.block_size (128)"),
         ("evaluate.max_new_tokens=126",)),
    Case("eval_prompt_over_block_size", "evaluate",
         ("model.block_size (128) is too small for data/prepared/eval.jsonl:1", "evaluate.cot_max_new_tokens (120)"),
         ("evaluate.cot_max_new_tokens=120",)),
    Case("unknown_align_method_in_params", "align", ("align.method 'rlhf'", "dpo, grpo, kto, online_dpo, orpo, ppo"),
         break_it=lambda: replace_in(Path("params.yaml"), "method: ppo", "method: rlhf")),
    Case("unknown_artifact_mode", "report", ("logger.wandb.artifacts 'copy' is unknown", "reference, files, none"),
         ("logger=wandb", "logger.wandb.artifacts=copy")),
    Case("logger_target_does_not_import", "pretrain",
         ("logger.dvclive._target_ 'dvclive.lightning.DVCLiveLoger' does not import", "has no attribute"),
         ("logger.dvclive._target_=dvclive.lightning.DVCLiveLoger",)),
    Case("logger_argument_unknown", "sft", ("logger.csv: cannot build lightning.pytorch.loggers.CSVLogger",
                                            "unexpected keyword argument 'savedir'"),
         ("logger=[dvclive,csv]", "+logger.csv.savedir=outputs/x")),
    Case("callback_argument_missing", "reward", ("callbacks.early_stopping: cannot build", "'monitor'"),
         ("callbacks=early_stopping", "~callbacks.early_stopping.monitor")),
    Case("bad_align_field_in_sft_control", "sft_control",
         ("align.minibatch_size (1000) must be <= align.rollout_batch",), ("align.minibatch_size=1000",)),
    Case("special_tokens_without_end", "tokenizer", ("tokenizer.special_tokens has 4 entries", "end '<|end|>'"),
         edit_cfg=set_cfg("tokenizer.special_tokens", ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>"])),
    Case("vocab_size_too_small", "tokenizer", ("tokenizer.vocab_size is 100", ">= 261"),
         ("tokenizer.vocab_size=100",), subprocess=True),
    Case("cot_template_without_question", "evaluate", ("evaluate.prompts.cot", "{question}"),
         edit_cfg=set_cfg("evaluate.prompts.cot", "{trigger}")),
    Case("unknown_template_field", "evaluate", ("evaluate.prompts.zero_shot", "'answer'"),
         edit_cfg=set_cfg("evaluate.prompts.zero_shot", "{question} = {answer}")),
    Case("zero_sft_size", "prepare", ("data.sizes.sft is 0",), ("data.sizes.sft=0",), subprocess=True),
    Case("hub_source_file_missing", "prepare", ("data.sources.sft.data_files", "missing/smoltalk.jsonl"),
         ("data.sources.sft.source=files", "data.sources.sft.adapter=smoltalk",
          "data.sources.sft.data_files=missing/smoltalk.jsonl")),
    Case("init_from_missing_dir", "tokenizer", ("model.init_from", "/does/not/exist is not a directory"),
         ("model.init_from=hf:/does/not/exist",)),
    Case("missing_params_yaml", "report", ("params.yaml not found", "make params"),
         break_it=lambda: Path("params.yaml").unlink(), subprocess=True),
    # ---- inputs: prepared data
    Case("empty_sft_split", "sft", ("data/prepared/sft.jsonl has no rows", "data.sizes.sft"),
         break_it=lambda: SFT.write_text("")),
    Case("malformed_json_line", "sft", ("data/prepared/sft.jsonl:5: not valid JSON", "dvc repro prepare"),
         break_it=lambda: edit_line(SFT, 5, lambda line: line[: len(line) // 2] + "\n")),
    Case("row_missing_field", "sft", ("data/prepared/sft.jsonl:3: missing field 'messages'",),
         break_it=lambda: edit_line(SFT, 3, drop_field("messages"))),
    Case("preference_row_missing_field", "reward", ("data/prepared/preference.jsonl:7: missing field 'rejected'",),
         break_it=lambda: edit_line(Path("data/prepared/preference.jsonl"), 7, drop_field("rejected"))),
    Case("conversation_over_block_size", "sft",
         ("data/prepared/sft.jsonl:4: the conversation has", "tokens, more than model.block_size (128)"),
         break_it=lambda: edit_line(SFT, 4, lengthen_reply)),
    # ---- inputs: tokenizer and token shards
    Case("tokenizer_json_lacks_special_token", "sft",
         ("artifacts/tokenizer/tokenizer.json lacks the special tokens ['<|end|>']", "tokenizer.special_tokens"),
         break_it=lambda: replace_in(TOKENIZER, "<|end|>", "<|eot|>")),
    Case("corrupt_tokenizer_json", "sft", ("artifacts/tokenizer/tokenizer.json is not a readable tokenizer",
                                           "dvc repro tokenizer"),
         break_it=lambda: TOKENIZER.write_text("{")),
    Case("tokenizer_changed_since_checkpoint", "sft",
         ("checkpoint 'pretrain' was trained with tokenizer", "artifacts/tokenizer/tokenizer.json is",
          "rerun the stages after `tokenizer`"),
         break_it=lambda: TOKENIZER.write_text(TOKENIZER.read_text() + "\n")),
    Case("token_shards_from_another_tokenizer", "pretrain",
         ("data/tokens/pretrain.json was written by another tokenizer", "dvc repro tokenizer"),
         break_it=lambda: TOKENIZER.write_text(TOKENIZER.read_text() + "\n")),
    # ---- inputs: checkpoints
    Case("reward_checkpoint_in_place_of_sft", "align", ("artifacts/sft holds a 'reward' checkpoint", "dvc repro sft"),
         break_it=put_reward_in_place_of_sft),
    Case("missing_upstream_checkpoint", "align", ("checkpoint 'sft' not found in artifacts/sft", "dvc repro sft"),
         break_it=lambda: shutil.rmtree("artifacts/sft")),
    Case("missing_last_checkpoint_of_evaluate", "evaluate", ("checkpoint 'aligned' not found", "dvc repro align"),
         break_it=lambda: shutil.rmtree("artifacts/aligned")),
    Case("truncated_weights", "sft", ("artifacts/pretrain/model.safetensors is damaged", "dvc repro pretrain"),
         break_it=lambda: truncate(Path("artifacts/pretrain/model.safetensors"))),
    Case("invalid_meta_json", "sft", ("artifacts/pretrain/meta.json is damaged", "dvc repro pretrain"),
         break_it=lambda: Path("artifacts/pretrain/meta.json").write_text('{"kind": "gpt",')),
]


@pytest.fixture
def workdir(micro_chain: Path, tmp_path: Path, monkeypatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(micro_chain, work, ignore=shutil.ignore_patterns("wandb"), symlinks=True)
    monkeypatch.chdir(work)
    return work


def run_case(case: Case, capsys) -> tuple[int, str, float]:
    """Run the stage as users do; return (exit code, stderr, seconds)."""
    start = time.perf_counter()
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", f"stages.{case.stage}"], capture_output=True, text=True,
                              env=venv_env(PYTHONPATH=str(REPO)), timeout=120)
        return proc.returncode, proc.stderr, time.perf_counter() - start
    from stages import main

    with pytest.raises(SystemExit) as exit_info:
        main(case.stage)
    return exit_info.value.code, capsys.readouterr().err, time.perf_counter() - start


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_the_stage_before_work(case: Case, workdir: Path, capsys) -> None:
    cfg = compose_micro(*case.overrides)
    if case.edit_cfg:
        case.edit_cfg(cfg)
    OmegaConf.save(cfg, "params.yaml")
    for out in outputs(case.stage):
        remove(out)
    if case.break_it:
        case.break_it()

    code, err, seconds = run_case(case, capsys)

    assert code not in (0, None), f"stage {case.stage} exited {code}"
    for culprit in case.culprits:
        if culprit.startswith("re:"):
            assert re.search(culprit[3:], err), f"no match for {culprit[3:]!r} in: {err}"
        else:
            assert culprit in err, f"{culprit!r} not named in: {err}"
    assert f"error in stage {case.stage!r}" in err
    left = [p for p in outputs(case.stage) if p.exists()]
    left += list(workdir.rglob(".*.tmp-*"))
    assert not left, f"outputs left behind: {left}"
    if not case.subprocess:  # validation before work: no model built, nothing trained
        assert seconds < 2.0, f"stage {case.stage} took {seconds:.1f} s to fail"
