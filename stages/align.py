"""Stage `align`: the SFT checkpoint aligned by the configured method, one module per method
(pipeline/alignment/methods: ppo against the reward model, dpo on preference pairs, grpo on the generator's
checker), chosen with `align=<name>`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Checkpoint, Curve, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config


def _reads(cfg: Config | None) -> dict[str, str]:
    """What the configured method reads besides the SFT policy (None: what any method may read)."""
    from pipeline.alignment import methods
    return methods.needs(cfg)


def _splits(cfg: Config) -> tuple[str, ...]:
    from pipeline.alignment import methods
    method, acfg = methods.load(cfg)
    return (*method.splits(acfg), *(("eval",) if acfg.eval_every else ()))  # the monitor answers eval problems


SPEC = StageSpec(
    name="align",
    desc="The SFT model aligned by the configured method (align=<method>: conf/align/)",
    params=("seed", "align", "trainer", "strategy", "callbacks", "peft"),
    inputs=(paths.PREPARED, paths.TOKENIZER_DIR),
    reads={"sft": "gpt"},
    reads_for=_reads,
    splits=_splits,
    writes=(Checkpoint("aligned", "gpt", "The SFT model aligned with the configured method (align=ppo, dpo or grpo)",
                       ("gpt", "chat", "aligned")),),
    # train/reward: the reward model's score (ppo), the checker's (grpo), the implicit reward margin (dpo);
    # train/kl: the policy's KL to the SFT reference
    curves=(Curve("reward_kl", ("train/reward", "train/kl")),
            # the monitor's held-out evaluations (align.eval_every): checked accuracy against the proxy reward
            Curve("eval", ("eval/exact_match", "eval/reward"))),
    trains=True,
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.alignment import methods
    from pipeline.harness.validation import check_inputs, check_sampled_prompts
    from pipeline.inference.placement import check_placement, world_size
    from pipeline.model.lora import check_adapters
    from stages import registry
    _, acfg = methods.load(cfg)  # the method's own config
    check_placement(cfg.trainer)
    methods.check_world(acfg, world_size(cfg.trainer), cfg.strategy.name, getattr(cfg.strategy, "stage", None))
    inputs = check_inputs(cfg, spec)
    check_adapters(cfg.peft, spec.name, inputs.metas[spec.checkpoint("gpt")]["model"], registry())
    check_sampled_prompts(inputs, inputs.block_size(spec.checkpoint("gpt")),
                          {f"align.{k}": v for k, v in acfg.answer_budgets().items()})
    from pipeline.training.loggers import check as check_loggers
    check_loggers(cfg, spec.name)  # every logger and callback builds; DVCLive is there under DVC


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.alignment.align import align
    return align(cfg, spec)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
