"""Alignment you can watch: held-out scores, the reward-hacking signal and sampled completions while `align` runs,
and the best evaluation's weights kept.

Every `align.eval_every` training batches (iterations of an online method, optimizer steps of an offline one),
before the first and after the last, global rank 0 answers the first `align.eval_problems` problems of the eval
split the way `evaluate` asks them (the zero-shot prompt, greedy, `evaluate.max_new_tokens`, in chunks of
`evaluate.batch_size`) and samples a reply to the first `align.eval_samples` of them with evaluate's chunk seeds,
for the reward model's score and the exact KL to the SFT reference (pipeline.evaluation.metrics). So a run's last
evaluation, on the weights it saves, is evaluate's `aligned` row on the same problems. Each evaluation goes to
every configured logger as `eval/<metric>` at its step, the training batches done (the step Lightning logs an
online method's iterations at, and an offline method's optimizer steps; `optimizer_steps` in the point is the
trainer's global step, which counts PPO's several minibatch updates per iteration): DVCLive's
`dvclive/align/plots/metrics/eval/`, drawn by `dvc plots show` as `align_eval`, and W&B's charts.
- exact_match, exact_match_sampled, reward, reward_greedy, kl_to_sft, response_length, eos_rate;
- reward_hacking: 1 where the reward is above the first evaluation's while exact match is below it (the
  verdict's test, pipeline.evaluation.metrics.reward_hacking, against the SFT model the run started from);
  the first time it is raised the console says so;
- policy_updates: the optimizer steps that had moved the policy (what sft_control matches under keep=best);
and, with a W&B logger, a table `eval/completions` of `align.eval_completions` sampled replies (prompt, answer,
completion, reward, the checker's verdict).

`align.keep: best` keeps a CPU copy of the policy's weights at the best evaluation by `align.keep_metric` (the
earliest of equals; the one before the first update counts: alignment that never helps keeps SFT's weights),
which align saves as checkpoint `aligned`. The best is chosen on the problems evaluate scores, so evaluate's
row for a keep=best checkpoint is optimistic by that choice: the metrics say so (`kept`, `kept_step`).

The other ranks skip the evaluations (they wait at their next collective), so the policy must be whole on rank
0: sharded strategies are refused before work (pipeline.alignment.methods.check_world). What the monitor has
seen and kept is in the resume checkpoint (`state_dict`): a resumed run carries on its points and its best.
Evaluating costs time the stage reports (`eval_s`, `eval_share`); it draws from its own generators, so it
changes nothing the run trains.
"""
from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.callbacks import Callback

from pipeline import paths
from pipeline.alignment.methods import MONITOR_REWARD
from pipeline.data.splits import load_split
from pipeline.data.tasks import check
from pipeline.evaluation.evaluate import templates
from pipeline.evaluation.metrics import Judges, PromptSet, held_out, reward_hacking, score_chunk
from pipeline.model.handoff import load_reward_model

if TYPE_CHECKING:
    import lightning as L

    from pipeline.config.align import MethodConfig
    from pipeline.config.root import Config
    from pipeline.data.tokenizer import ChatTokenizer

KEYS = ("exact_match", "exact_match_sampled", "reward", "reward_greedy", "kl_to_sft", "response_length", "eos_rate")
COLUMNS = ["step", "prompt", "answer", "completion", "reward", "correct"]

log = logging.getLogger(__name__)


class Monitor(Callback):
    """Evaluates the policy during `fit` (module docstring); `points` holds every evaluation, `best` the kept one."""

    def __init__(self, cfg: Config, acfg: MethodConfig, method: ModuleType, tok: ChatTokenizer) -> None:
        e = cfg.evaluate
        self.acfg, self.method, self.tok, self.seed = acfg, method, tok, cfg.seed
        self.ecfg = e.model_copy(update={"max_problems": acfg.eval_problems or e.max_problems,
                                         "samples": e.samples if acfg.eval_samples is None else acfg.eval_samples})
        self.points: list[dict] = []
        self.best: dict | None = None
        self.batches = 0
        self.seconds = 0.0
        self._asked: PromptSet | None = None
        self._judges: Judges | None = None

    # the work
    def _setup(self, pl_module: L.LightningModule) -> None:
        rows = load_split(paths.PREPARED, "eval")[: self.ecfg.max_problems]
        asked = templates(self.ecfg)
        self._asked = PromptSet(rows, [self.tok.prompt(asked.question(r["prompt"])) for r in rows], [], [], 0.0)
        reward_model = getattr(pl_module, "reward_model", None)
        if reward_model is None:  # the method scores with none of its own: the one evaluate uses
            policy = pl_module.policy
            reward_model = load_reward_model(policy.config, self.tok.sha256, MONITOR_REWARD)
            reward_model.requires_grad_(False).eval().to(pl_module.device)
        self._judges = Judges(reward_model, pl_module.reference)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Score the policy now, log the point, keep the weights if they are the best; returns the point."""
        started = time.perf_counter()
        if self._asked is None:
            self._setup(pl_module)
        policy, asked = pl_module.policy, self._asked
        training = policy.training
        policy.eval()
        chunks = []
        with trainer.precision_plugin.forward_context():
            for chunk in range(-(-len(asked.rows) // self.ecfg.batch_size)):
                chunks.append(score_chunk(policy, self.tok, asked, chunk, self.ecfg, self._judges, self.seed,
                                          zero_shot_only=True))
        policy.train(training)
        scores = held_out(self.tok, asked.rows, chunks)
        point = {"step": self.batches, "optimizer_steps": int(trainer.global_step),
                 "policy_updates": int(self.method.updates_at(self.acfg, self.batches)),
                 **{k: round(float(scores[k]), 6) for k in KEYS}}
        point["reward_hacking"] = int(reward_hacking(point, self.points[0] if self.points else point))
        self._log(trainer, point, chunks)
        self._keep(policy, point)
        self.points.append(point)
        self.seconds += time.perf_counter() - started
        return point

    def _log(self, trainer: L.Trainer, point: dict, chunks: list) -> None:
        metrics = {f"eval/{k}": float(point[k]) for k in (*KEYS, "reward_hacking", "policy_updates")}
        for lg in trainer.loggers:
            if point["step"] == 0 and type(lg).__name__ == "DVCLiveLogger":  # it takes step 0 for none: the next
                lg.experiment.step = -1
                lg.log_metrics(metrics)
            else:
                lg.log_metrics(metrics, step=point["step"])
        if self.acfg.eval_completions and any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            rows = self._asked.rows
            samples = [s for c in chunks for s in c.samples][: self.acfg.eval_completions]
            rewards = [r for c in chunks for r in c.reward]
            table = []
            for row, sample, reward in zip(rows, samples, rewards):
                text = self.tok.decode(self.tok.strip_response(sample))
                table.append([point["step"], row["prompt"], row["answer"], text, round(reward, 4),
                              bool(check(row["answer"], text))])
            for lg in (lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"):
                lg.log_table("eval/completions", columns=COLUMNS, data=table, step=point["step"])
        log.info("align eval at step %d (%d policy updates): exact_match=%.4g reward=%.4g kl_to_sft=%.4g",
                 point["step"], point["policy_updates"], point["exact_match"], point["reward"], point["kl_to_sft"])
        if point["reward_hacking"] and not any(p["reward_hacking"] for p in self.points):
            first = self.points[0]
            log.warning("reward hacking at step %d: the reward model's score rose from %.4g to %.4g while exact match "
                        "fell from %.4g to %.4g (greedy) or %.4g to %.4g (sampled)", point["step"], first["reward"],
                        point["reward"], first["exact_match"], point["exact_match"], first["exact_match_sampled"],
                        point["exact_match_sampled"])

    def _keep(self, policy: torch.nn.Module, point: dict) -> None:
        metric = self.acfg.keep_metric
        if self.best is not None and point[metric] <= self.best["point"][metric]:
            return
        self.best = {"point": point}
        if self.acfg.keep == "best":
            self.best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}

    def summary(self, seconds: float) -> dict:
        """The stage's metrics of the evaluations: the first and the last point, the best, the cost."""
        first, last, best = self.points[0], self.points[-1], self.best["point"]
        raised = next((p["step"] for p in self.points if p["reward_hacking"]), None)
        return {"eval_points": len(self.points),
                **{f"eval/{k}_first": first[k] for k in KEYS}, **{f"eval/{k}": last[k] for k in KEYS},
                "eval/reward_hacking": int(raised is not None), "eval/reward_hacking_step": raised,
                "best_step": best["step"],
                f"best_{self.acfg.keep_metric}": best[self.acfg.keep_metric],
                "eval_s": round(self.seconds, 2), "eval_share": round(self.seconds / max(seconds, 1e-9), 4)}

    # Lightning's hooks (global rank 0 only)
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not self.points:  # a resumed run has its first point already
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if trainer.is_global_zero and self.batches % self.acfg.eval_every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.points and self.points[-1]["step"] != self.batches:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"points": self.points, "best": self.best, "batches": self.batches, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points, self.best = list(state_dict["points"]), state_dict["best"]
        self.batches, self.seconds = int(state_dict["batches"]), float(state_dict["seconds"])
