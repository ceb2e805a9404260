"""conf/ is the single source: params.yaml matches it, every option composes, loads into its schema and
builds; the schemas' defaults are conf/'s; a wrong key or value is refused naming the field and the fix."""
from __future__ import annotations

import re
import typing
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import pytest
import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel

from pipeline.alignment import methods
from pipeline.config.load import compose
from pipeline.config.loggers import WandbEntry
from pipeline.config.model import ModelConfig
from pipeline.config.root import Config, load_config
from pipeline.config.schema import ConfigError
from pipeline.paths import CONF_DIR

REPO = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_params_yaml_equals_the_composed_defaults():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    composed = OmegaConf.to_container(compose())
    assert committed == composed, "params.yaml is stale: run `make params` (python -m pipeline.config)"


def test_dvc_hydra_integration_is_on_and_analytics_off():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text
    assert "analytics = false" in text


@pytest.mark.parametrize("name", options("model"))
def test_every_model_option_builds_a_valid_config(name):
    shape = ModelConfig.parse(compose([f"model={name}"]).model).shape(512)
    assert shape.vocab_size % 64 == 0 and shape.vocab_size >= 512


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
    from pipeline.training.trainer import build_trainer
    cfg = load_config(compose([f"trainer={trainer}", f"strategy={strategy}", "logger=none"]))
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
    from pipeline.training.trainer import build_strategy
    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        with pytest.raises(ValueError, match=r"\.\[deepspeed\]"):
            build_strategy(load_config(compose([f"strategy={name}"])))


def test_unknown_strategy_is_refused_with_the_choices():
    message = ("strategy.name 'horovod' is unknown: choose one of auto, ddp, fsdp, fsdp2, deepspeed "
               "(strategy=<name>, files in conf/strategy/)")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(compose(["strategy.name=horovod"]))


def test_global_batch_in_tokens_sets_accumulation_or_names_the_fix():
    from pipeline.training.trainer import accumulation_steps, build_trainer
    assert accumulation_steps(524288, 16 * 1024, 8) == 4
    with pytest.raises(ValueError, match="pretrain.global_batch_tokens"):
        accumulation_steps(1000, 16 * 1024, 8)
    built = build_trainer(load_config(compose(["logger=none"])), "test", max_steps=1, global_batch_tokens=8 * 128 * 4,
                          micro_batch_tokens=8 * 128)
    assert built.accumulate_grad_batches == 4


def test_peak_flops_come_from_lightnings_device_table_and_the_override_wins():
    import torch
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    from pipeline.training.hardware import peak_flops
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3") as name, \
            mock.patch("lightning.fabric.accelerators.cuda._is_ampere_or_later", return_value=True):
        assert peak_flops("cuda:0", "bf16-mixed") == _CUDA_FLOPS["h100 sxm"][torch.bfloat16] == 989.4e12
        assert peak_flops("cuda:0", "16-mixed") == _CUDA_FLOPS["h100 sxm"][torch.float16]
        assert peak_flops("cuda:0", "32-true") == _CUDA_FLOPS["h100 sxm"][torch.float32]  # matmul precision "highest"
        with mock.patch("torch.get_float32_matmul_precision", return_value="high"):
            assert peak_flops("cuda:0", "32-true") == _CUDA_FLOPS["h100 sxm"]["tfloat32"]  # TF32 tensor cores
        assert name.called  # the name torch reports picks the row
        assert peak_flops("cuda:0", "bf16-mixed", override_tflops=123.0) == 123e12  # trainer.peak_tflops wins
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"):
        assert peak_flops("cuda:0", "bf16-true") == _CUDA_FLOPS["a100"][torch.bfloat16]
    with mock.patch("torch.cuda.get_device_name", return_value="Some Future GPU"), \
            pytest.warns(UserWarning, match="FLOPs not found"):
        assert peak_flops("cuda:0", "bf16-mixed") is None  # unlisted: no MFU unless trainer.peak_tflops is set
    assert peak_flops("cpu", "32-true") is None
    assert peak_flops("cpu", "32-true", override_tflops=1.5) == 1.5e12


def test_flops_per_token_counts_6n_plus_attention():
    from pipeline.model.gpt import GPT
    model = GPT(ModelConfig.parse(compose(["model=gpt2_124m"]).model).shape(50257))
    assert model.config.vocab_size == 50304
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()  # tied head counted once
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    assert 6 * 124e6 < model.flops_per_token() < 6 * 124e6 * 1.3


def chosen_groups() -> list[str]:
    """The groups conf/config.yaml's defaults list lets a user choose (not those it picks by interpolation)."""
    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    entries = [next(iter(d.items())) for d in defaults if isinstance(d, dict)]
    return [key for key, value in entries if " " not in key and "${" not in str(value)]


def test_every_config_group_directory_is_chosen_in_the_defaults_list():
    choosable = set(chosen_groups()) | {"experiment_align"}  # picked by ${experiment}_${align}
    assert {p.name for p in CONF_DIR.iterdir() if p.is_dir()} == choosable


@pytest.mark.parametrize("group", chosen_groups())
def test_every_option_of_every_group_composes_and_loads(group):
    for name in options(group):
        cfg = load_config(compose([f"{group}={name}"]))
        methods.load(cfg)  # the alignment method's own fields too


def test_micro_experiment_shrinks_the_default():
    default, micro = compose(), compose(["experiment=micro"])
    assert micro.model.n_embd < default.model.n_embd
    assert micro.pretrain.max_steps < default.pretrain.max_steps
    assert list(micro.logger) == ["dvclive"]  # no W&B runs; DVCLive writes the declared plots


def _defaults(schema: type[BaseModel], composed: dict, where: str) -> list[str]:
    """Where a default of `schema` differs from the composed default config (`composed`, at `where`)."""
    wrong = []
    for name, info in schema.model_fields.items():
        if info.is_required() or name not in composed:
            continue
        default = info.get_default(call_default_factory=True)
        value = default.to_dict() if isinstance(default, BaseModel) else default
        if isinstance(value, tuple):
            value = list(value)
        if value != composed[name]:
            wrong.append(f"{where}.{name}: schema {value!r}, conf {composed[name]!r}")
    return wrong


def group_schema(name: str, composed: dict) -> type[BaseModel] | None:
    """The schema of config group `name` (for the strategy union: the member the composed `name` picks)."""
    info = Config.model_fields[name]
    members = [m for m in typing.get_args(info.annotation) or (info.annotation,)
               if isinstance(m, type) and issubclass(m, BaseModel)]
    if info.discriminator:
        return next(m for m in members if composed.get("name") in typing.get_args(m.model_fields["name"].annotation))
    return members[0] if members else None


def test_every_schema_default_is_the_default_config():
    """conf/ is the one source of defaults: a schema's default (for code that builds a config in Python) is
    the value conf/ composes to, for every group and for every alignment method in its own file."""
    composed = OmegaConf.to_container(compose())
    wrong = []
    for name in Config.model_fields:
        if name in ("logger", "callbacks"):  # sets of chosen entries, not defaults: an absent entry is not chosen
            continue
        schema = group_schema(name, composed[name]) if isinstance(composed[name], dict) else None
        if schema is not None:
            wrong += _defaults(schema, composed[name], name)
    wrong += _defaults(WandbEntry, composed["logger"]["wandb"], "logger.wandb")  # its fields' defaults are conf's
    for method in methods.names():
        wrong += _defaults(methods.module(method).Config, OmegaConf.to_container(compose([f"align={method}"]).align),
                           f"align ({method})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("change", "message"), [
    ({"sft": {"max_stepz": 10}}, "sft.max_stepz is not a setting of sft: did you mean sft.max_steps?"),
    ({"model": {"n_layr": 2}}, "model.n_layr is not a setting of model: did you mean model.n_layer?"),
    ({"trainer": {"precison": "32-true"}},
     "trainer.precison is not a setting of trainer: did you mean trainer.precision?"),
    ({"pretrian": {}}, "pretrian is not a setting of the config: did you mean pretrain?"),
    ({"data": {"sources": {"sft": {"adaptor": "smoltalk"}}}},
     "data.sources.sft.adaptor is not a setting of data.sources.sft: did you mean data.sources.sft.adapter?"),
    ({"sft": {"batch_size": "64"}}, "sft.batch_size is '64': it must be an integer"),
    ({"sft": {"max_steps": 1.5}}, "sft.max_steps is 1.5: it must be an integer"),
    ({"pretrain": {"optim": {"lr": -1e-3}}}, "pretrain.optim.lr is -0.001: it must be positive"),
    ({"reward": {"val_fraction": 1.0}}, "reward.val_fraction is 1.0: it must be in (0, 1)"),
    ({"trainer": {"compile": "yes"}}, "trainer.compile is 'yes': it must be true or false"),
    ({"resume": {"mode": "always"}}, "resume.mode 'always' is unknown: choose one of auto, never, force"),
])
def test_a_wrong_key_or_value_is_refused_naming_the_field_and_the_fix(change, message):
    raw = OmegaConf.to_container(compose())
    for group, values in change.items():
        raw[group] = OmegaConf.to_container(OmegaConf.merge(raw.get(group, {}), values)) if values else values
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(raw)


def test_every_problem_is_named_at_once():
    raw = OmegaConf.to_container(compose())
    raw["sft"]["batch_size"], raw["model"]["n_layr"] = 0, 2
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert "sft.batch_size is 0: it must be >= 1" in str(err.value) and "model.n_layr" in str(err.value)
