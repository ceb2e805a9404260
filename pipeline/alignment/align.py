"""The align stage: the SFT checkpoint aligned by the configured method (pipeline.alignment.methods), saved as
checkpoint `aligned`, with metrics naming the method and the policy updates it made (what sft_control matches).

The frozen reference that KL and DPO's implicit reward are measured against is passed to the method as a model
to call: a second copy of the SFT checkpoint, or, when the policy trains LoRA adapters (`peft.stages` lists
align), the policy itself with its adapters off (pipeline.model.lora.AdaptersOff), which is the SFT model
without a second copy in memory. The methods call it the same way either way.

Every method trains under the configured strategy (`trainer`, `strategy`): each rank samples its share of the
global rollout or preference batch, and global rank 0 saves the trained policy (gathered first when sharded).

With `align.eval_every` > 0 the run is evaluated as it goes (pipeline.alignment.monitor: held-out exact match,
reward, KL to SFT, the reward-hacking signal, sampled completions), and `align.keep: best` saves the best
evaluation's weights instead of the last; the checkpoint's meta and the metrics record the policy updates behind
the saved weights (`policy_updates`), which is what sft_control trains the control for."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import lightning as L

from pipeline.alignment import methods
from pipeline.alignment.monitor import Monitor
from pipeline.data.tokenizer import load_tokenizer
from pipeline.model import lora
from pipeline.model.handoff import checkpoint_meta, load_gpt, save_checkpoint
from pipeline.training.curves import first_last

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec


def iteration_times(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per iteration spent generating and training (online methods log both: time/...), and the
    generation's share of the two."""
    gen = [r["time/generation_s"] for r in rows if r.get("time/generation_s") is not None]
    train = [r["time/training_s"] for r in rows if r.get("time/training_s") is not None]
    if not gen or not train:
        return {}
    g, t = sum(gen) / len(gen), sum(train) / len(train)
    return {"generation_s_per_iteration": round(g, 4), "training_s_per_iteration": round(t, 4),
            "generation_share": round(g / max(g + t, 1e-9), 4)}


def align(cfg: Config, spec: StageSpec) -> dict:
    method, acfg = methods.load(cfg)
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    start = spec.checkpoint("gpt")
    policy, _ = load_gpt(start, tok.sha256)
    adapters = lora.applies(cfg.peft, spec.name)
    if not adapters:
        reference, _ = load_gpt(start, tok.sha256)  # the frozen copy KL and DPO's implicit reward are measured against
    L.seed_everything(cfg.seed, verbose=False)
    if adapters:
        policy = lora.add_adapters(policy, cfg.peft)
        reference = lora.AdaptersOff(policy)
    updates = method.policy_updates(acfg)
    monitor = Monitor(cfg, acfg, method, tok) if acfg.eval_every else None
    started = time.perf_counter()
    watch = [monitor] if monitor else None
    curves, own, policy = method.train(cfg, acfg, spec, policy, reference, tok, callbacks=watch)
    if policy is None:  # not global rank 0: that one saves the checkpoint and writes the metrics
        return {}
    metrics = {"method": acfg.label(), "policy_updates": updates, **own, **first_last(curves.train, method.SUMMARY),
               **iteration_times(curves.train), **curves.totals}
    if monitor:
        metrics.update(monitor.summary(time.perf_counter() - started))
        metrics["kept"] = acfg.keep
        if acfg.keep == "best":  # the best evaluation's weights, and the updates that made them
            policy.load_state_dict(monitor.best["state"])
            updates = metrics["policy_updates"] = monitor.best["point"]["policy_updates"]
            metrics["policy_updates_run"] = method.policy_updates(acfg)
        metrics["kept_step"] = monitor.best["point"]["step"] if acfg.keep == "best" else monitor.points[-1]["step"]
    trained = {}
    if adapters:  # only then: the meta and metrics of full finetuning stay as they were
        metrics.update(lora.param_counts(policy))
        trained = lora.adapter_meta(cfg.peft, policy)
        policy = lora.merge(policy)
    save_checkpoint(spec.writes[0].name, policy, checkpoint_meta(cfg, tok, policy, "gpt", method=acfg.label(),
                                                                step=updates, policy_updates=updates, **trained))
    return metrics
