"""Exchange with Hugging Face transformers: start from a pretrained checkpoint, export one back.

Four architectures map onto the pipeline's GPT: `GPT2LMHeadModel`, and the Llama family
(`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`: rotary positions, RMSNorm, SwiGLU,
grouped-query attention; Qwen2 adds biases to Q, K and V). The mapping is written here rather than going
through transformers' own classes for three reasons: the pipeline trains its own module (one model file
for every stage, its KV cache and left padding), import must refuse what that module cannot compute
before any work, naming the config.json field, and export must write a directory without importing
transformers (seconds of import time, and an optional extra).

Import (`model.init_from=hf:DIR`, read by the `tokenizer` and `pretrain` stages):
- `pretrained_shape` reads DIR's config.json: the user restates nothing. `model.block_size` (the context
  trained at, at most the checkpoint's) and `model.dropout` stay training choices; the vocabulary is the
  checkpoint's, grown (and padded to `model.vocab_multiple`) when the tokenizer stage added tokens.
  Sliding-window attention narrower than block_size, mixtures of experts, rotary scalings other than
  Llama 3's and a partial rotary factor are refused.
- `load_pretrained` reads safetensors weights directly (one file, or shards listed by
  `model.safetensors.index.json`, every shard checked first), in any float dtype (bf16 included), cast
  to the model's. Q, K and V are concatenated into the fused `c_attn`; GPT-2's `Conv1D` matrices, stored
  (in, out), are transposed. Embedding rows beyond the checkpoint's vocabulary (tokens the tokenizer stage
  added) start at the mean of the existing rows, as transformers' `resize_token_embeddings` does, so a new
  token is not sampled out of nowhere.

Export writes what `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
read, offline: `model.safetensors` under the architecture's own names, `config.json`,
`generation_config.json`, the workspace's `tokenizer.json` unchanged, `tokenizer_config.json` (special
tokens, chat template: the tokenizer's `hf_tokenizer_config`) and `gpt_pipeline.json` (which checkpoint,
which tokenizer). A model keeps the architecture it was imported as (`model.architecture`); a model built
here gets the one its switches describe (GPT-2's layout, or Llama's; Qwen2's when only Q, K and V have
biases).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pipeline.config.model import GPTConfig, ModelConfig
from pipeline.data.tokenizer import import_tokenizer, load_tokenizer
from pipeline.input_files import read_json, require_file
from pipeline.io import atomic_dir, write_json
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt
from pipeline.paths import TOKENIZER_FILE

if TYPE_CHECKING:
    from pipeline.data.tokenizer import ChatTokenizer

INSTALL_HINT = "pip install -e '.[export]'"
LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", **LLAMA_FAMILY}
# the pipeline's activation <-> GPT-2's activation_function
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# weights a checkpoint may hold that are buffers or duplicates, not parameters the model needs
IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def require_transformers():
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"loading a Hugging Face checkpoint with transformers needs it: {INSTALL_HINT}") from err
    return transformers


# ---------------------------------------------------------------------------------- config.json -> shape

def read_hf_config(path: Path) -> tuple[dict, str]:
    """DIR's config.json and its architecture (one of ARCHITECTURES), or an error naming the field."""
    file = path / "config.json"
    try:
        config = read_json(file, "model.init_from needs the checkpoint's config.json as save_pretrained writes it",
                           missing=f"model.init_from: {file} not found: not a transformers checkpoint directory "
                                   "(save_pretrained writes config.json beside the weights)")
    except ValueError as err:  # damaged, not an object, a link to nothing
        raise ValueError(f"model.init_from: {err}") from None
    archs = config.get("architectures") or []
    by_type = {v: k for k, v in ARCHITECTURES.items()}
    arch = archs[0] if archs else by_type.get(config.get("model_type"))
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.init_from: {file} has architectures={archs} (model_type "
                         f"{config.get('model_type')!r}); the pipeline's model computes {sorted(ARCHITECTURES)}")
    return config, arch


def _rope(c: dict, where: str) -> dict[str, Any]:
    """rope_theta and rope_scaling from either layout: the classic keys, or transformers 5's rope_parameters."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if c.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where} has partial_rotary_factor={c.get('partial_rotary_factor')}: the pipeline "
                         "rotates whole heads only")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return {"rope_theta": float(theta)}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"{where} has rope_scaling.rope_type={kind!r}; the pipeline computes Llama 3's scaling "
                         "('llama3') only")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"rope_theta": float(theta), "rope_scaling": {"rope_type": "llama3", **{k: scaling[k] for k in keys}}}


def _llama_fields(c: dict, arch: str, where: str, block_size: int) -> dict[str, Any]:
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    lacking = [k for k in required if k not in c]
    if lacking:
        raise ValueError(f"{where} lacks {', '.join(lacking)}: not a complete {arch} config")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where} has hidden_act={c['hidden_act']!r}; the Llama family's SwiGLU uses 'silu'")
    experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if c.get(k)]
    if experts:
        raise ValueError(f"{where} has {experts[0]}={c[experts[0]]}: a mixture of experts, which the pipeline's "
                         "dense model does not compute")
    window = c.get("sliding_window")
    windowed = window is not None and (arch == "MistralForCausalLM" or c.get("use_sliding_window", False)
                                       or "sliding_attention" in (c.get("layer_types") or []))
    if windowed and window < block_size:
        raise ValueError(f"{where} has sliding_window={window}: each token attends to the last {window} only, "
                         f"while the pipeline attends over all of model.block_size ({block_size}): set "
                         f"model.block_size={window} or less")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    qwen = arch == "Qwen2ForCausalLM"
    attention_bias = bool(c.get("attention_bias", False))
    return {"n_layer": c["num_hidden_layers"], "n_head": heads, "n_embd": c["hidden_size"],
            "n_kv_head": c.get("num_key_value_heads") or heads,
            "head_dim": None if head_dim * heads == c["hidden_size"] else head_dim,
            "pos_encoding": "rope", **_rope(c, where), "norm": "rmsnorm",
            "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
            "mlp": "swiglu", "intermediate_size": c["intermediate_size"], "bias": False,
            "qkv_bias": qwen or attention_bias, "o_bias": attention_bias and not qwen,
            "mlp_bias": bool(c.get("mlp_bias", False)), "tie_embeddings": bool(c.get("tie_word_embeddings", False))}


def _gpt2_fields(c: dict, where: str) -> dict[str, Any]:
    activation = FROM_HF_ACTIVATION.get(c.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(f"{where} has activation_function {c.get('activation_function')!r}; the pipeline's GPT "
                         f"computes {sorted(FROM_HF_ACTIVATION)} only")
    fixed = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    for key, allowed in fixed.items():
        if c.get(key, allowed) != allowed:
            raise ValueError(f"{where} has {key}={c[key]}; the pipeline's GPT computes only {key}={allowed}")
    return {"n_layer": c.get("n_layer", 12), "n_head": c.get("n_head", 12), "n_embd": c.get("n_embd", 768),
            "intermediate_size": c.get("n_inner"), "activation": activation, "pos_encoding": "learned",
            "norm": "layernorm", "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)), "mlp": "gelu", "bias": True,
            "tie_embeddings": bool(c.get("tie_word_embeddings", True))}


def max_positions(c: dict, arch: str) -> int:
    return c.get("n_positions", 1024) if arch == "GPT2LMHeadModel" else c.get("max_position_embeddings", 2048)


def pretrained_shape(model: ModelConfig, tokenizer_vocab: int, path: Path | None = None) -> GPTConfig:
    """The GPTConfig of `model.init_from`'s checkpoint, trained at `model.block_size`, with room for a
    tokenizer of `tokenizer_vocab` tokens; refuses, naming the field, what the pipeline cannot compute."""
    path = path or model.init_dir()
    c, arch = read_hf_config(path)
    where = str(path / "config.json")
    limit = max_positions(c, arch)
    if model.block_size > limit:
        raise ValueError(f"model.block_size ({model.block_size}) exceeds {where}'s "
                         f"{'n_positions' if arch == 'GPT2LMHeadModel' else 'max_position_embeddings'} ({limit}): "
                         f"set model.block_size={limit} or less")
    fields = _gpt2_fields(c, where) if arch == "GPT2LMHeadModel" else _llama_fields(c, arch, where, model.block_size)
    theirs = c.get("vocab_size") or tokenizer_vocab
    vocab = theirs if theirs >= tokenizer_vocab else -(-tokenizer_vocab // model.vocab_multiple) * model.vocab_multiple
    if model.vocab_size is not None:
        if model.vocab_size < max(theirs, tokenizer_vocab):
            raise ValueError(f"model.vocab_size ({model.vocab_size}) is smaller than {where}'s vocab_size ({theirs}) "
                             f"or the tokenizer's {tokenizer_vocab} tokens: set model.vocab_size=null")
        vocab = model.vocab_size
    return GPTConfig.parse({**fields, "vocab_size": vocab, "block_size": model.block_size, "dropout": model.dropout,
                            "architecture": arch}, where=where)


def model_shape(model: ModelConfig, tokenizer_vocab: int) -> GPTConfig:
    """The shape a stage builds: the imported checkpoint's (`model.init_from`) or the config group's."""
    return model.shape(tokenizer_vocab) if model.init_from is None else pretrained_shape(model, tokenizer_vocab)


# ---------------------------------------------------------------------------------------- weight names

def architecture(cfg: GPTConfig) -> str:
    """The transformers architecture a model exports as, or an error saying why none fits."""
    gpt2 = cfg.pos_encoding != "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.kv_heads == cfg.n_head
    llama = cfg.pos_encoding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    qkv, o, mlp = cfg.has_bias("qkv"), cfg.has_bias("o"), cfg.has_bias("mlp")
    fits = {"GPT2LMHeadModel": gpt2 and cfg.head_dim in (None, cfg.n_embd // cfg.n_head),
            "LlamaForCausalLM": llama and qkv == o,
            "Qwen2ForCausalLM": llama and qkv and not o and not mlp,
            "MistralForCausalLM": llama and not (qkv or o or mlp) and cfg.rope_scaling is None}
    arch = cfg.architecture or ("GPT2LMHeadModel" if gpt2 else "Qwen2ForCausalLM" if llama and qkv and not o
                                else "LlamaForCausalLM")
    if not fits[arch]:
        raise ValueError(f"the model's switches (pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, mlp={cfg.mlp}, "
                         f"n_kv_head={cfg.kv_heads}, biases qkv={qkv} o={o} mlp={mlp}) fit no {arch}: GPT-2 is "
                         "learned or sinusoidal + layernorm + gelu; the Llama family rope + rmsnorm + swiglu")
    return arch


def weight_names(cfg: GPTConfig, arch: str) -> list[tuple[str, tuple[str, ...], bool]]:
    """(the pipeline's parameter, the checkpoint's tensors it is made of in order, whether each is stored
    transposed); a parameter of several tensors is their concatenation along its output dimension."""
    gpt2 = arch == "GPT2LMHeadModel"
    names: list[tuple[str, tuple[str, ...], bool]] = []

    def add(ours: str, *theirs: str, transpose: bool = False, bias: bool = False) -> None:
        names.append((f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), transpose))
        if bias:
            names.append((f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), False))

    if gpt2:
        add("wte", "transformer.wte")
        add("wpe", "transformer.wpe")
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for part in ("ln_1", "ln_2"):
                add(f"h.{i}.{part}", p + part, bias=True)
            for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                add(f"h.{i}.{part}", p + part, transpose=True, bias=True)
        add("ln_f", "transformer.ln_f", bias=True)
    else:
        add("wte", "model.embed_tokens")
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            add(f"h.{i}.ln_1", p + "input_layernorm")
            add(f"h.{i}.attn.c_attn", *(p + f"self_attn.{x}_proj" for x in "qkv"), bias=cfg.has_bias("qkv"))
            add(f"h.{i}.attn.c_proj", p + "self_attn.o_proj", bias=cfg.has_bias("o"))
            add(f"h.{i}.ln_2", p + "post_attention_layernorm")
            add(f"h.{i}.mlp.c_gate", p + "mlp.gate_proj", bias=cfg.has_bias("mlp"))
            add(f"h.{i}.mlp.c_fc", p + "mlp.up_proj", bias=cfg.has_bias("mlp"))
            add(f"h.{i}.mlp.c_proj", p + "mlp.down_proj", bias=cfg.has_bias("mlp"))
        add("ln_f", "model.norm")
    if not cfg.tie_embeddings:
        add("lm_head", "lm_head")
    return names


def split_sizes(cfg: GPTConfig, n_parts: int, rows: int) -> list[int]:
    """How a fused parameter's rows divide among its checkpoint tensors (`c_attn`: Q, K, V)."""
    if n_parts == 1:
        return [rows]
    q, kv = cfg.n_head * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    return [q, kv, kv]


# --------------------------------------------------------------------------------------------- import

def weight_files(path: Path) -> list[Path]:
    """DIR's safetensors files: the shards its index lists (each checked to be there), or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"model.init_from: {index} is not a safetensors index (no weight_map: {err})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"model.init_from: {index} lists the shard {missing[0]}{more}, which is not in "
                                    f"{path}: copy or download every shard of the checkpoint")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file() or single.is_symlink():
        try:
            require_file(single, "copy the checkpoint's weights file there")
        except ValueError as err:  # a link to nothing, or a directory
            raise ValueError(f"model.init_from: {err}") from None
        return [single]
    raise FileNotFoundError(f"model.init_from: {path} has no model.safetensors or model.safetensors.index.json (a "
                            "pytorch_model.bin checkpoint: load it with transformers and save_pretrained it again, "
                            "which writes safetensors)")


def _read(path: Path, tensors: bool) -> dict[str, Any]:
    """Every tensor of DIR's weights (`tensors`), else every tensor's shape (the headers only)."""
    out: dict[str, Any] = {}
    for file in weight_files(path):
        if file.stat().st_size == 0:
            raise ValueError(f"model.init_from: {file} is not a readable safetensors file (it is empty)")
        try:
            with safe_open(str(file), "pt") as f:
                out.update({k: f.get_tensor(k) if tensors else tuple(f.get_slice(k).get_shape())
                            for k in f.keys()})  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise ValueError(f"model.init_from: {file} is not a readable safetensors file ({err})") from None
    # GPT-2 checkpoints from old transformers versions lack the `transformer.` prefix
    if out and all(not k.startswith(("transformer.", "model.")) for k in out) and any(k.startswith("h.") for k in out):
        out = {k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in out.items()}
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of DIR's safetensors weights, in the dtype it is stored in."""
    return _read(path, tensors=True)  # type: ignore[return-value]


def check_weights(path: Path, cfg: GPTConfig, names: set[str] | None = None) -> None:
    """Refuse weights that lack a tensor the model needs, hold one it has no place for, or (`names` not given: read
    from the headers) hold one of a shape `load_pretrained` could not copy."""
    shapes = _read(path, tensors=False) if names is None else None
    names = set(shapes) if shapes is not None else names
    files = weight_files(path)
    where = files[0] if len(files) == 1 else path  # the file, where there is one
    needed = {t for _, theirs, _ in weight_names(cfg, cfg.architecture or architecture(cfg)) for t in theirs}
    lacking = sorted(needed - names)
    if lacking:
        more = " ..." if len(lacking) > 3 else ""
        raise ValueError(f"model.init_from: the weights in {where} lack {lacking[:3]}{more}, which its config.json "
                         "says the model has")
    extra = sorted(n for n in names - needed if not n.endswith(IGNORED) and not (n == "lm_head.weight"
                                                                              and cfg.tie_embeddings))
    if extra:
        raise ValueError(f"model.init_from: the weights in {where} hold {extra[:3]}{' ...' if len(extra) > 3 else ''}, "
                         "which the pipeline's model has no place for (an architecture option it does not compute)")
    problem = _shape_problem(cfg, shapes, read_hf_config(path)[0].get("vocab_size")) if shapes is not None else None
    if problem:
        raise ValueError(f"model.init_from: the weights in {where} hold {problem}: they are not the weights of the "
                         f"model {path / 'config.json'} describes")


def _shape_problem(cfg: GPTConfig, shapes: dict[str, tuple[int, ...]], vocab: int | None) -> str | None:
    """The first checkpoint tensor(s) whose shape `load_pretrained` could not copy into a model of `cfg` (built on
    the meta device), described, or None. The rules are load_pretrained's: embedding rows may be fewer (the
    tokenizer stage added tokens) but are config.json's `vocab` where it has one, position rows more (a longer
    context than model.block_size)."""
    with torch.device("meta"):
        params = dict(GPT(cfg).named_parameters())
    for ours, theirs, transpose in weight_names(cfg, cfg.architecture or architecture(cfg)):
        parts = [shapes[t][::-1] if transpose and t.endswith(".weight") else shapes[t] for t in theirs]
        target = tuple(params[ours].shape)
        same_width = all(p and p[1:] == parts[0][1:] for p in parts)
        rows = sum(p[0] for p in parts) if same_width else -1
        embedding = 0 < rows <= target[0] and rows == (vocab or rows)
        rows_ok = {"wte.weight": embedding, "lm_head.weight": embedding,
                   "wpe.weight": rows >= target[0]}.get(ours, rows == target[0])
        if not same_width or parts[0][1:] != target[1:] or not rows_ok:
            held = ", ".join(f"{t} of shape {list(shapes[t])}" for t in theirs)
            layout = " (stored transposed)" if transpose else ""
            return f"{held} where the model needs {list(target)}{layout} for its {ours}"
    return None


def check_pretrained(model: ModelConfig, tokenizer_vocab: int) -> GPTConfig:
    """Everything importing `model.init_from` would refuse, from config.json and the weights' headers alone."""
    shape = pretrained_shape(model, tokenizer_vocab)
    check_weights(model.init_dir(), shape)
    return shape


@torch.no_grad()
def load_pretrained(model: GPT, path: Path) -> GPT:
    """Copy DIR's weights into `model` (built from `pretrained_shape`); returns `model`."""
    cfg = model.config
    tensors = read_weights(path)
    check_weights(path, cfg, set(tensors))
    params = dict(model.named_parameters())
    for ours, theirs, transpose in weight_names(cfg, cfg.architecture or architecture(cfg)):
        parts = [tensors[t].t() if transpose and t.endswith(".weight") else tensors[t] for t in theirs]
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        target = params[ours]
        if ours in ("wte.weight", "lm_head.weight") and value.shape[0] < target.shape[0]:
            n = value.shape[0]
            target[:n] = value.to(target.dtype)
            target[n:] = value.float().mean(0).to(target.dtype)  # new tokens start at the mean embedding
        elif ours == "wpe.weight":
            target.copy_(value[:target.shape[0]])
        elif value.shape != target.shape:
            raise ValueError(f"model.init_from: {path}'s {theirs[0]} has shape {tuple(value.shape)} where the model "
                             f"its config.json describes needs {tuple(target.shape)}")
        else:
            target.copy_(value)
    return model


def check_imported_tokenizer(path: Path, tokenizer: Tokenizer, special_tokens: list[str]) -> None:
    """Refuse to start from DIR's weights with a tokenizer other than DIR's (plus the special tokens)."""
    if tokenizer.get_vocab() != import_tokenizer(path, special_tokens).get_vocab():
        raise ValueError(f"model.init_from: the workspace's tokenizer is not {path / 'tokenizer.json'}: rerun the "
                         "`tokenizer` stage with the same model.init_from (dvc repro tokenizer) so the corpus is "
                         "tokenized with the ids the imported weights know")


# ---------------------------------------------------------------------------------------------- export

def hf_state_dict(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under `arch`'s names and layouts (fp32, contiguous, no shared storage)."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if cfg.pos_encoding == "sinusoidal":  # the fixed sinusoids are just a position table GPT-2 can hold
        sd["wpe.weight"] = model.pe.detach().float().cpu()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, transpose in weight_names(cfg, arch):
        # GPT-2 always has biases: a model without them exports zeros there
        value = sd.get(ours, torch.zeros(sd[ours.replace(".bias", ".weight")].shape[1 if transpose else 0]))
        for name, part in zip(theirs, value.split(split_sizes(cfg, len(theirs), value.shape[0]), dim=0)):
            out[name] = part.t() if transpose and name.endswith(".weight") else part
    return {k: v.clone().contiguous() for k, v in out.items()}


def hf_config(cfg: GPTConfig, arch: str, ids: dict[str, int | None]) -> dict:
    """config.json of `arch` with this model's shape; `ids` maps pad/bos/eos to token ids."""
    common = {"architectures": [arch], "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "use_cache": True,
              "initializer_range": 0.02, "dtype": "float32"}
    if arch == "GPT2LMHeadModel":
        return {**common, "model_type": "gpt2", "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,
                "activation_function": TO_HF_ACTIVATION[cfg.activation], "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    out = {**common, "model_type": LLAMA_FAMILY[arch], "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.dim_per_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_scaling": cfg.rope_scaling.model_dump() if cfg.rope_scaling else None,
           "attention_dropout": cfg.dropout}
    if arch == "LlamaForCausalLM":
        out |= {"attention_bias": cfg.has_bias("qkv"), "mlp_bias": cfg.has_bias("mlp")}
    else:  # Mistral and Qwen2: full attention over the context (no sliding window)
        out |= {"sliding_window": None, "use_sliding_window": False}
    return out


def generation_config(cfg: GPTConfig, ids: dict[str, int | None]) -> dict:
    """generation_config.json: greedy, as `evaluate` decodes (transformers' pipeline() samples when do_sample is
    unset), stopping at the end-of-turn token or at the context the model was trained with (max_length, prompt
    included: the pipeline's default of 256 new tokens would run past GPT-2's position table)."""
    return {"do_sample": False, "max_length": cfg.block_size, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"]}


def check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not an earlier export (it is replaced whole)."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "gpt_pipeline.json").is_file()):
        raise ValueError(f"{out} exists and is not an earlier export: choose an empty or new directory for --out")


def export_model(model: GPT, tok: ChatTokenizer, tokenizer_file: str | Path, out: str | Path,
                 provenance: dict | None = None) -> Path:
    """Write `model` and its tokenizer as a transformers directory `out` (replaced atomically)."""
    out = Path(out)
    check_out_dir(out)
    arch = architecture(model.config)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{tokenizer_file} has {tok.vocab_size} tokens, more than the model's "
                         f"{model.config.vocab_size}: the checkpoint was trained with another tokenizer")
    ids = tok.hf_token_ids()
    tokenizer_config = tok.hf_tokenizer_config(model.config.block_size)
    with atomic_dir(out) as tmp:
        save_file(hf_state_dict(model, arch), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(model.config, arch, ids))
        write_json(tmp / "generation_config.json", generation_config(model.config, ids))
        Tokenizer.from_file(str(tokenizer_file)).save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        specials = ("bos_token", "eos_token", "pad_token", "additional_special_tokens")
        write_json(tmp / "special_tokens_map.json", {k: tokenizer_config[k] for k in specials if k in tokenizer_config})
        write_json(tmp / "gpt_pipeline.json", {"model": model.config.to_dict(), "architecture": arch,
                                               **(provenance or {})})
    return out


def export_checkpoint(name: str, out: str | Path, special_tokens: list[str], producer: str | None = None) -> Path:
    """Export checkpoint `name` (e.g. aligned) with the workspace's tokenizer."""
    tok = load_tokenizer(special_tokens)
    model, meta = load_gpt(name, tok.sha256, producer)
    provenance = {"checkpoint": name, "tokenizer_sha256": tok.sha256,
                  **{k: meta.get(k) for k in ("step", "run_id", "git_commit", "git_dirty", "created")}}
    return export_model(model, tok, TOKENIZER_FILE, out, provenance)
