"""conf/ is the single source: params.yaml matches it, every option composes and builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import CONF_DIR, compose
from pipeline.model import GPTConfig

REPO = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_params_yaml_equals_the_composed_defaults():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    composed = OmegaConf.to_container(compose())
    assert committed == composed, "params.yaml is stale: run `make params` (python -m pipeline.params)"


def test_dvc_hydra_integration_is_on_and_analytics_off():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text
    assert "analytics = false" in text


@pytest.mark.parametrize("name", options("model"))
def test_every_model_option_builds_a_valid_config(name):
    m = OmegaConf.to_container(compose([f"model={name}"]).model)
    m.pop("vocab_multiple")
    m["vocab_size"] = m["vocab_size"] or 512
    GPTConfig.from_dict(m)


def test_gpt2_124m_has_the_published_shape():
    m = compose(["model=gpt2_124m"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)


@pytest.mark.parametrize("name", [n for n in options("strategy") if n != "deepspeed"])
def test_every_strategy_option_builds(name):
    from pipeline.train import build_strategy
    assert build_strategy(compose([f"strategy={name}"])) is not None


def test_deepspeed_without_the_extra_says_how_to_install_it():
    pytest.importorskip("lightning")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    from pipeline.train import build_strategy
    with pytest.raises(ValueError, match=r"\.\[deepspeed\]"):
        build_strategy(compose(["strategy=deepspeed"]))


def test_unknown_strategy_is_refused_with_the_choices():
    from pipeline.train import build_strategy
    cfg = compose()
    cfg.strategy.name = "horovod"
    with pytest.raises(ValueError, match="auto, ddp, fsdp or deepspeed"):
        build_strategy(cfg)


@pytest.mark.parametrize("group", ["trainer", "logger", "align", "data", "experiment"])
def test_every_option_of_a_group_composes(group):
    for name in options(group):
        compose([f"{group}={name}"])


def test_micro_experiment_shrinks_the_default():
    default, micro = compose(), compose(["experiment=micro"])
    assert micro.model.n_embd < default.model.n_embd
    assert micro.pretrain.max_steps < default.pretrain.max_steps
    assert micro.logger.name == "none"
