"""Alignment you can watch (pipeline/alignment/monitor.py): evaluations during the run, the live reward-hacking
signal, sampled completions in W&B, the best evaluation's weights kept, and the control matched to them."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_micro, micro_config, seeded_workspace, venv_env

KEYS = ("exact_match", "exact_match_sampled", "reward", "kl_to_sft")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A micro chain of this module's own up to sft_control (not the session's `micro_chain`: these tests then
    run beside that group's under pytest-xdist)."""
    from stages import run_stage
    work = seeded_workspace(tmp_path_factory.mktemp("watched"))
    old = Path.cwd()
    os.chdir(work)
    try:
        for stage in ("sft", "reward", "align", "sft_control"):
            run_stage(stage, compose_micro())
    finally:
        os.chdir(old)
    return work


@pytest.fixture
def chain_copy(chain, tmp_path, monkeypatch) -> Path:
    """A copy of the module's chain to run stages in."""
    work = tmp_path / "w"
    shutil.copytree(chain, work)
    monkeypatch.chdir(work)
    return work


def steps_of(work: Path, metric: str) -> dict[int, float]:
    from pipeline.evaluation.figures import read_steps
    return read_steps(work / "dvclive" / "align" / "plots" / "metrics" / "eval" / f"{metric}.tsv")


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_the_last_evaluation_is_evaluates_aligned_row(chain_copy, method):
    """Each batch is evaluated (micro: eval_every=1) and logged as DVC plots; the last point, on the weights align
    saves, is what evaluate measures of them on the same problems."""
    from stages import run_stage
    align = run_stage("align", compose_micro(f"align={method}"))
    evaluated = run_stage("evaluate", compose_micro(f"align={method}"))["aligned"]
    for key in KEYS:
        assert align[f"eval/{key}"] == pytest.approx(evaluated[key], abs=0.02), key
    batches = 2 + (1 if method == "ppo" else 0)  # micro: 2 iterations (+ 1 critic warmup for PPO)
    assert align["eval_points"] == batches + 1  # before the first batch, then after each
    curve = steps_of(chain_copy, "exact_match")
    assert min(curve) == 0 and len(curve) == batches + 1
    trained = steps_of(chain_copy, "../train/reward")  # the method's own curve: the same step axis
    assert max(curve) - 1 <= max(trained) <= max(curve) == batches
    assert steps_of(chain_copy, "reward")[max(curve)] == pytest.approx(align["eval/reward"], abs=1e-5)
    assert 0 < align["eval_share"] < 1 and align["eval_s"] > 0
    assert align["kept"] == "last" and align["kept_step"] == max(curve)


def test_evaluating_changes_nothing_the_run_trains(chain_copy):
    from stages import run_stage

    def aligned(*overrides: str) -> dict[str, torch.Tensor]:
        run_stage("align", compose_micro("align.steps=3", "align.optim.lr=1e-2", *overrides))
        return load_file(chain_copy / "artifacts" / "aligned" / "model.safetensors")

    watched, unwatched = aligned("align.eval_every=1"), aligned("align.eval_every=0")
    assert watched.keys() == unwatched.keys() and all(torch.equal(watched[k], unwatched[k]) for k in watched)
    sft = load_file(chain_copy / "artifacts" / "sft" / "model.safetensors")
    assert any(not torch.equal(watched[k], sft[k]) for k in watched)  # and it did train


class LengthReward(torch.nn.Module):
    """A reward model with a wrong pattern: it scores a response by its length, whatever it says."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 1)  # where the scorers look for its device

    def forward(self, idx, last, attention_mask=None, response_mask=None):
        return response_mask.float().sum(1)


def teach(model, tok, rows: list[dict], steps: int = 200) -> None:
    """Train `model` on the rows' answers until it gets most of them right (an SFT model with accuracy to lose)."""
    from pipeline.data.tokenizer import IGNORE_INDEX
    pairs = [tok.conversation(r["prompt"], r["answer"]) for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    x = torch.tensor([ids + [tok.pad_id] * (width - len(ids)) for ids, _ in pairs])
    y = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_reward_model_that_pays_for_length_raises_the_hacking_signal_during_the_run(chain_copy):
    """PPO against a reward for long answers: the policy stops ending its replies, the reward rises and exact match
    falls, and the monitor says so at that evaluation, while align still runs (no evaluate stage at all)."""
    from pipeline.alignment import methods
    from pipeline.alignment.methods.ppo import PPO
    from pipeline.alignment.monitor import Monitor
    from pipeline.data.datamodules import PromptData
    from pipeline.data.splits import load_split
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt, load_reward_model
    from pipeline.paths import PREPARED
    from pipeline.registry import StageSpec
    from pipeline.training.trainer import fit

    cfg = micro_config("align.steps=6", "align.critic_warmup=0", "align.kl_coef=0", "align.optim.lr=1e-2",
                       "align.missing_eos_penalty=0", "align.eval_every=1", "align.eval_problems=8",
                       "align.eval_samples=8", "align.max_new_tokens=6")
    method, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    policy, reference = load_gpt("sft")[0], load_gpt("sft")[0]
    teach(policy, tok, load_split(PREPARED, "eval")[:8])
    reference.load_state_dict(policy.state_dict())  # the run starts from this model: SFT as far as it knows
    critic = load_reward_model(policy.config).drop_likelihood_term()
    monitor = Monitor(cfg, acfg, method, tok)
    module = PPO(policy.train(), reference, critic.train(), LengthReward(), tok, acfg, seed=0)
    spec = StageSpec("align", "a test")
    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append
    logging.getLogger("pipeline.alignment.monitor").addHandler(handler)
    try:
        fit(module, PromptData(PREPARED, acfg.rollout_batch, acfg.steps, 0), cfg, spec, callbacks=[monitor],
            validate=False, max_epochs=1, log_every=1)
    finally:
        logging.getLogger("pipeline.alignment.monitor").removeHandler(handler)
    first, *later = monitor.points
    assert first["exact_match"] >= 0.5 and first["reward_hacking"] == 0  # it knew the answers, and ended them
    raised = [p for p in later if p["reward_hacking"]]
    assert raised, [(p["reward"], p["exact_match"]) for p in monitor.points]
    assert raised[0]["reward"] > first["reward"] and raised[0]["exact_match"] < first["exact_match"]
    assert sum("reward hacking at step" in r.getMessage() for r in said) == 1  # said once, when raised
    hacking = steps_of(chain_copy, "reward_hacking")  # the DVC plot has it, step by step
    assert hacking[0] == 0 and hacking[raised[0]["step"]] == 1


def test_keep_best_saves_the_best_evaluations_weights_and_the_control_matches_them(chain_copy):
    """align.keep=best: the saved weights are those of the best evaluation's step (its resume checkpoint), not the
    last, and sft_control trains as many steps as the kept weights had updates."""
    from stages import run_stage
    overrides = ("align.steps=6", "align.optim.lr=1e-2", "align.score_clip=0", "align.keep=best",
                 "align.keep_metric=reward", "resume.keep=10")
    metrics = run_stage("align", compose_micro(*overrides))
    rewards = steps_of(chain_copy, "reward")
    best = max(rewards, key=lambda s: (rewards[s], -s))  # the earliest of the highest
    assert metrics["best_step"] == metrics["kept_step"] == best and metrics["best_reward"] == pytest.approx(
        rewards[best], abs=1e-5)

    def policy_at(iteration: int) -> dict[str, torch.Tensor]:  # named by iteration, as the monitor's steps are
        if iteration == 0:
            return load_file(chain_copy / "artifacts" / "sft" / "model.safetensors")
        path = chain_copy / "outputs" / "resume" / "align" / f"step-{iteration:08d}.ckpt"
        state = torch.load(path, weights_only=True)["state_dict"]
        return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}

    aligned = load_file(chain_copy / "artifacts" / "aligned" / "model.safetensors")
    expected = policy_at(best)
    # the file keeps one name of each tied pair (wte / lm_head): its every tensor is the kept step's
    assert aligned.keys() <= expected.keys() and all(torch.equal(aligned[k], expected[k]) for k in aligned)
    last = policy_at(6 + 1)  # 6 iterations after micro's 1 critic warmup
    assert (best == max(rewards)) == all(torch.equal(aligned[k], last[k]) for k in aligned)
    meta = json.loads((chain_copy / "artifacts" / "aligned" / "meta.json").read_text())
    # micro PPO: 2 updates an iteration once the warmup iteration is over
    assert meta["policy_updates"] == metrics["policy_updates"] == 2 * max(0, best - 1)
    assert metrics["policy_updates_run"] == 12
    control = run_stage("sft_control", compose_micro(*overrides))
    assert control["steps"] == metrics["policy_updates"]


def test_keep_best_without_evaluations_is_refused():
    from pipeline.alignment import methods
    with pytest.raises(ValueError, match=r"align.keep is best, which needs evaluations during the run: set "
                                         r"align.eval_every > 0"):
        methods.load(micro_config("align.keep=best", "align.eval_every=0"))


def test_completions_reach_a_wandb_table(chain_copy):
    """In a process of its own (W&B's records are complete once it exits): the eval points and the table of
    sampled completions are in the run's records."""
    from wandb_records import run_info
    env = {k: v for k, v in venv_env(WANDB_MODE="offline", OMP_NUM_THREADS="1").items() if k != "DVC_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=align", "experiment=micro", "align=grpo",
                           "trainer.progress_bar=false", "logger=[wandb,dvclive]", "align.eval_completions=3",
                           "hydra.run.dir=."],
                          cwd=chain_copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (chain_copy / "wandb").glob("offline-run-*")
    info = run_info(run)
    assert {"eval/exact_match", "eval/reward", "eval/reward_hacking", "eval/completions/_type"} <= info["history_keys"]
    assert info["last"]["eval/completions/_type"] == "table-file" and info["last"]["eval/completions/nrows"] == 3
    tables = sorted((run / "files" / "media" / "table" / "eval").glob("completions_*.table.json"))
    assert len(tables) == json.loads((chain_copy / "metrics" / "align.json").read_text())["eval_points"]
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "answer", "completion", "reward", "correct"]
    assert len(table["data"]) == 3 and all(isinstance(row[5], bool) for row in table["data"])
