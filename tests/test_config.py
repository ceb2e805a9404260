"""conf/ is the single source: params.yaml matches it, every option composes and builds."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

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
    m.pop("vocab_multiple"), m.pop("init_from")  # where the weights start, not the shape (context.gpt_config)
    m["vocab_size"] = m["vocab_size"] or 512
    GPTConfig.from_dict(m)


def test_gpt2_124m_has_the_published_shape():
    m = compose(["model=gpt2_124m"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)


def deepspeed_installed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def eight_gpus():
    """Pretend this machine has 8 CUDA devices: the only way to build a GPU Trainer without one."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pl_cuda
    import torch
    with mock.patch.object(fabric_cuda, "num_cuda_devices", return_value=8), \
            mock.patch.object(pl_cuda, "num_cuda_devices", return_value=8), \
            mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "device_count", return_value=8):
        yield


STRATEGY_CLASS = {"auto": "SingleDeviceStrategy", "ddp": "DDPStrategy", "fsdp": "FSDPStrategy",
                  "fsdp2": "ModelParallelStrategy", "deepspeed_zero2": "DeepSpeedStrategy",
                  "deepspeed_zero3": "DeepSpeedStrategy"}


@pytest.mark.parametrize("trainer", options("trainer"))
@pytest.mark.parametrize("strategy", options("strategy"))
def test_every_trainer_and_strategy_option_instantiates(trainer, strategy):
    """Each conf/trainer x conf/strategy pair builds a real Lightning Trainer (GPUs simulated where needed)."""
    if strategy.startswith("deepspeed") and not deepspeed_installed():
        pytest.skip("deepspeed is an optional extra (pip install -e '.[deepspeed]') and is not installed here")
    if trainer == "cpu" and strategy == "fsdp":
        pytest.skip("Lightning's FSDPStrategy refuses CPU; strategy=fsdp2 is the sharded choice there")
    from pipeline.train import build_trainer
    cfg = compose([f"trainer={trainer}", f"strategy={strategy}", "logger=none"])
    with eight_gpus() if trainer != "cpu" else nullcontext():
        built = build_trainer(cfg, "test", max_steps=1)
    name = STRATEGY_CLASS[strategy]
    if strategy == "auto" and trainer != "cpu":
        name = "DDPStrategy"  # Lightning picks DDP for several devices
    assert type(built.strategy).__name__ == name
    assert built.num_nodes == cfg.trainer.num_nodes
    assert built.world_size == (1 if trainer == "cpu" else 8 * cfg.trainer.num_nodes)
    if strategy == "fsdp2":  # every process is a data-parallel rank
        assert built.strategy._data_parallel_size == built.world_size


def test_deepspeed_without_the_extra_says_how_to_install_it():
    if deepspeed_installed():
        pytest.skip("deepspeed is installed")
    from pipeline.train import build_strategy
    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        with pytest.raises(ValueError, match=r"\.\[deepspeed\]"):
            build_strategy(compose([f"strategy={name}"]))


def test_unknown_strategy_is_refused_with_the_choices():
    from pipeline.train import build_strategy
    cfg = compose()
    cfg.strategy.name = "horovod"
    with pytest.raises(ValueError, match="auto, ddp, fsdp, fsdp2, deepspeed"):
        build_strategy(cfg)


def test_global_batch_in_tokens_sets_accumulation_or_names_the_fix():
    from pipeline.train import accumulation_steps, build_trainer
    assert accumulation_steps(524288, 16 * 1024, 8) == 4
    with pytest.raises(ValueError, match="pretrain.global_batch_tokens"):
        accumulation_steps(1000, 16 * 1024, 8)
    built = build_trainer(compose(["logger=none"]), "test", max_steps=1, global_batch_tokens=8 * 128 * 4,
                          micro_batch_tokens=8 * 128)
    assert built.accumulate_grad_batches == 4


def test_peak_flops_are_looked_up_per_device_and_precision():
    from pipeline.hardware import peak_flops
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H200"), \
            mock.patch("torch.cuda.is_available", return_value=True):
        assert peak_flops("cuda:0", "bf16-mixed") == 989e12
        assert peak_flops("cuda:0", "32-true") == 494.5e12
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"), \
            mock.patch("torch.cuda.is_available", return_value=True):
        assert peak_flops("cuda:0", "bf16-mixed") == 312e12
    assert peak_flops("cpu", "32-true") is None
    assert peak_flops("cpu", "32-true", override_tflops=1.5) == 1.5e12


def test_flops_per_token_counts_6n_plus_attention():
    from pipeline.model import GPT
    cfg = compose(["model=gpt2_124m"]).model
    m = OmegaConf.to_container(cfg)
    m.pop("vocab_multiple"), m.pop("init_from")  # where the weights start, not the shape (context.gpt_config)
    m["vocab_size"] = 50304
    model = GPT(GPTConfig.from_dict(m))
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()  # tied head counted once
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    assert 6 * 124e6 < model.flops_per_token() < 6 * 124e6 * 1.3


@pytest.mark.parametrize("group", ["trainer", "logger", "align", "data", "experiment", "sweep", "cluster"])
def test_every_option_of_a_group_composes(group):
    for name in options(group):
        compose([f"{group}={name}"])


def test_micro_experiment_shrinks_the_default():
    default, micro = compose(), compose(["experiment=micro"])
    assert micro.model.n_embd < default.model.n_embd
    assert micro.pretrain.max_steps < default.pretrain.max_steps
    assert micro.logger.name == "none"
