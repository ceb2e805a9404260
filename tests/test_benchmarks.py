"""The training benchmarks run end to end in their smoke modes and print the JSON line they promise.

Speed itself is never asserted (STYLE.md habit 12): only that each path trained and was timed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, chain_copy, venv_env


def last_json_line(*args: str, timeout: int) -> dict:
    out = subprocess.run([sys.executable, "-m", *args], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env=venv_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_step_quick_compares_both_paths():
    result = last_json_line("benchmarks.train_step", "--quick", timeout=120)
    for key in ("pipeline_tokens_per_sec", "plain_tokens_per_sec", "ratio", "rounds", "steps", "model", "batch"):
        assert key in result
    assert result["pipeline_tokens_per_sec"] > 0 and result["plain_tokens_per_sec"] > 0
    assert result["ratio"] > 0 and result["rounds"] == 2
    # same seed, same batches, same optimizer: both paths did the same work
    assert abs(result["pipeline_last_loss"] - result["plain_last_loss"]) < 1e-3


def test_gpu_pretrain_cpu_smoke_mode():
    result = last_json_line("benchmarks.gpu_pretrain", "--device", "cpu", "--model", "micro", "--steps", "3",
                            "--batch-sizes", "2", "--vocab", "512", "--strategies", "auto", "ddp", timeout=180)
    runs = {(r["path"], r["strategy"]): r for r in result["runs"]}
    assert set(runs) == {("pipeline", "auto"), ("pipeline", "ddp"), ("plain", "-")}
    for r in runs.values():
        assert r["tokens_per_sec"] > 0 and r["ms_per_iter"] > 0
        assert r["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert result["precision"] == "32-true" and result["compile"] is False
    assert result["ratios"]["2"] > 0


def test_hf_generate_quick_compares_both_samplers():
    pytest.importorskip("transformers")
    result = last_json_line("benchmarks.hf_generate", "--quick", timeout=180)
    assert result["pipeline_tok_s_b2"] > 0 and result["hf_tok_s_b2"] > 0 and result["ratio_b2"] > 0
    assert result["same_tokens_b2"] is True  # greedy on the same exported weights: the same tokens


def test_hf_llama_quick_compares_both_models_on_the_same_weights():
    pytest.importorskip("transformers")
    result = last_json_line("benchmarks.hf_llama", "--quick", timeout=180)
    assert result["max_logit_gap"] < 1e-4  # imported through model.init_from: the same function
    assert result["ratio_forward"] > 0 and result["ratio_train"] > 0 and result["pipeline_train_tok_s"] > 0


def test_serving_quick_compares_one_client_with_two(micro_chain, tmp_path):
    workspace = chain_copy(micro_chain, tmp_path)
    result = last_json_line("benchmarks.serving", "--quick", "--workspace", str(workspace), timeout=180)
    assert result["req_s_1"] > 0 and result["req_s_2"] > 0 and result["ratio_req_s_2"] > 0
    assert result["tokens_1"] == result["tokens_2"] > 0  # temperature 0: the same replies either way


def test_packing_quick_compares_padded_and_packed_batches(micro_chain, tmp_path):
    workspace = chain_copy(micro_chain, tmp_path)
    result = last_json_line("benchmarks.packing", "--quick", "--batch", "16", "--workspace", str(workspace),
                            timeout=180)
    for workload in ("sft", "sft_wide", "reward"):
        assert result[f"{workload}_padded_tokens_s"] > 0 and result[f"{workload}_packed_tokens_s"] > 0
        assert result[f"{workload}_packed_padding"] < result[f"{workload}_padded_padding"]
        assert result[f"{workload}_ratio"] > 0
