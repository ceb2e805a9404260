"""Stage `reward`: a Bradley-Terry reward model (the SFT backbone + a scalar head) on preference pairs, some of
them the SFT policy's own wrong samples."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.registry import Checkpoint, Curve, StageSpec

if TYPE_CHECKING:
    from pipeline.config.root import Config


def _splits(cfg: Config) -> tuple[str, ...]:
    from pipeline.training.reward import on_policy_splits
    return on_policy_splits(cfg.reward.on_policy)


SPEC = StageSpec(
    name="reward",
    desc="A Bradley-Terry reward model (the SFT backbone + a scalar head) on preference pairs",
    params=("seed", "reward", "trainer", "strategy", "callbacks", "peft"),
    inputs=(paths.PREPARED, paths.TOKENIZER_DIR),
    reads={"sft": "gpt"},
    splits=_splits,
    writes=(Checkpoint("reward", "reward", "Bradley-Terry reward model, the SFT network with a scalar head",
                       ("reward-model",)),),
    curves=(Curve("accuracy", ("train/accuracy", "val/accuracy")),),
    trains=True,
)


def check(cfg: Config, spec: StageSpec) -> None:
    from pipeline.harness.validation import check_inputs, check_sampled_prompts
    from pipeline.inference.placement import check_placement
    from pipeline.model.lora import check_adapters
    from stages import registry
    check_placement(cfg.trainer)
    inputs = check_inputs(cfg, spec)
    check_adapters(cfg.peft, spec.name, inputs.metas[spec.checkpoint("gpt")]["model"], registry())
    check_sampled_prompts(inputs, inputs.block_size(spec.checkpoint("gpt")),
                          {"reward.on_policy.max_new_tokens": cfg.reward.on_policy.max_new_tokens})
    from pipeline.training.loggers import check as check_loggers
    check_loggers(cfg, spec.name)  # every logger and callback builds; DVCLive is there under DVC


def run(cfg: Config, spec: StageSpec) -> dict:
    from pipeline.training.reward import train_reward_model
    return train_reward_model(cfg, spec)


if __name__ == "__main__":
    from stages import main
    main(SPEC.name)
