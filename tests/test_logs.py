"""Logging of a stage run (pipeline/logs.py): the console, rank zero, the run's log file, progress, the summary line.

The whole chain's console output and log files, as `dvc repro` leaves them, are checked in test_dvc_pipeline.py."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from pipeline import logs


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def only_file(stage: str) -> Path:
    files = list(Path("outputs/logs", stage).glob("*.log"))
    assert len(files) == 1, files
    return files[0]


def test_the_console_is_concise_and_the_file_has_everything(workdir, capsys):
    with logs.stage_logging("pretrain") as path:
        logging.getLogger("pipeline.training.trainer").info("starting pretrain")
        logging.getLogger("pipeline.training.trainer").debug("a detail for the file")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info(logs.LITLOGGER_TIP + ", try installing ...")
        with warnings.catch_warnings():  # shown whatever filters earlier tests of this process left
            warnings.simplefilter("always")
            warnings.warn("a deprecated call, for the test", DeprecationWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "starting pretrain"
    assert "warning: " in err and "a deprecated call, for the test" in err  # warnings: on the console too
    assert "GPU available" not in err and "detail" not in err and "Tip" not in err
    assert path == only_file("pretrain") and path.parent == Path("outputs/logs/pretrain")
    text = path.read_text()
    for line in ("INFO    pipeline.training.trainer: starting pretrain", "DEBUG   pipeline.training.trainer: a detail",
                 "INFO    lightning.pytorch.utilities.rank_zero: GPU available", "WARNING py.warnings: ",
                 "a deprecated call, for the test"):
        assert line in text
    assert "Tip" not in text
    logging.getLogger("pipeline.training.trainer").info("after the stage")
    assert "after the stage" not in path.read_text()  # the file is the stage's only


def test_a_failed_stage_leaves_its_traceback_in_the_file(workdir, capsys):
    with pytest.raises(ValueError), logs.stage_logging("sft"):
        raise ValueError("sft.batch_size must be positive")
    text = only_file("sft").read_text()
    assert "stage sft failed" in text and "Traceback" in text and "sft.batch_size must be positive" in text
    assert "Traceback" not in capsys.readouterr().err  # the console gets the message (runner.exit_codes)


def test_only_rank_zero_logs_info_other_ranks_warn_and_keep_their_own_file(workdir, capsys, monkeypatch):
    monkeypatch.setattr(logs, "global_rank", lambda: 1)
    with logs.stage_logging("align") as path:
        logging.getLogger("pipeline.alignment.align").info("an info line")
        logging.getLogger("pipeline.alignment.align").warning("a warning line")
        assert list(logs.progress(range(8), "sampling")) == list(range(8))
    err = capsys.readouterr().err
    assert "an info line" not in err and "sampling" not in err
    assert "warning: [rank 1] a warning line" in err
    assert path.name.endswith("-rank1.log")
    assert "an info line" in path.read_text()  # each rank's file has all of its own lines
    assert logs.log_file("align", rank=0, now=0).name.endswith(".log") and "rank" not in logs.log_file("x", 0).name


def test_progress_off_a_terminal_is_a_few_log_lines(workdir, capsys, monkeypatch):
    monkeypatch.setattr(logs, "interactive", lambda: False)
    with logs.stage_logging("evaluate"):
        assert list(logs.progress(range(100), "evaluating sft")) == list(range(100))
        assert list(logs.progress(iter(range(3)), "no length")) == [0, 1, 2]  # no total: no lines, no error
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"evaluating sft: {n}/100" for n in (25, 50, 75, 100)]


def test_the_summary_line_names_a_few_key_metrics():
    line = logs.summary_line("pretrain", {"val_loss": 0.8503, "val_bpb": 0.5554, "mfu": None, "device": "cpu",
                                         "tokens_per_sec": 19524.8, "n_params": 858880}, 83.24)
    assert line == "stage pretrain done in 83.2 s: val_loss 0.8503, val_bpb 0.5554, tokens_per_sec 1.952e+04"
    evaluate = {"aligned": {"exact_match": 0.305, "kl_to_sft": 0.55}, "verdict": {"beats_sft": 1, "beats_control": 0}}
    assert logs.summary_line("evaluate", evaluate, 12.0) == (
        "stage evaluate done in 12.0 s: aligned exact_match 0.305, aligned kl_to_sft 0.55, beats_sft 1, beats_control 0"
    )
    assert logs.summary_line("report", {"figures": 3}, 1.0) == "stage report done in 1.0 s"


def test_lightnings_own_console_handlers_are_taken_off():
    import lightning  # noqa: F401  (its import adds a handler to the `lightning` logger)
    logs.adopt_lightning()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        assert not [h for h in logger.handlers if type(h) is logging.StreamHandler] and logger.propagate
