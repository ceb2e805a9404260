"""Exchange with Hugging Face transformers: export a checkpoint as a GPT-2 directory, import one back.

Export writes what `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
read, offline: `model.safetensors` (GPT-2 names, `transformer.*`), `config.json` (`model_type: gpt2`),
`generation_config.json`, the pipeline's `tokenizer.json` unchanged, `tokenizer_config.json` (the
special tokens and a Jinja chat template that renders the pipeline's token-level template) and
`gpt_pipeline.json` (which checkpoint, which tokenizer). The files are written here by hand, so
exporting needs neither transformers nor its import time; loading them is transformers' job.

The architectures differ only in storage: GPT-2's `Conv1D` keeps weights as (in, out) where
`nn.Linear` keeps (out, in), so every matrix is transposed; GPT-2 always has biases (zeros are
written for a `bias: false` model); sinusoidal positions are written into GPT-2's learned position
table (the sinusoids are just a fixed table); the LM head stays tied to `wte`; a vocabulary padded
beyond the tokenizer keeps its padding rows.

Import (`model.init_from=hf:DIR`, read by the `tokenizer` and `pretrain` stages) needs transformers
(`pip install -e '.[export]'`), imported inside the functions that use it. The `tokenizer` stage
takes DIR's `tokenizer.json` instead of training a BPE (`pipeline.data.tokenizer.import_tokenizer`
appends any of the pipeline's five special tokens it lacks after its vocabulary); `pretrain` checks
DIR's config.json against `model` (naming the field to change) before any work, then copies the
weights; embedding rows beyond DIR's vocabulary (the added special tokens, padding) keep their fresh
initialisation.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pipeline.config.model import GPTConfig
from pipeline.data.tokenizer import import_tokenizer, load_tokenizer
from pipeline.io import atomic_dir, write_json
from pipeline.model.gpt import GPT
from pipeline.model.handoff import load_gpt
from pipeline.paths import TOKENIZER_FILE

INSTALL_HINT = "pip install -e '.[export]'"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, what the pipeline's GPT uses
# the pipeline's activation -> GPT-2's activation_function, and every GPT-2 name each one computes
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# (pipeline suffix, GPT-2 suffix, transpose) inside block i; LayerNorms keep their shape
BLOCK_PARAMS = [("ln_1", "ln_1", False), ("attn.c_attn", "attn.c_attn", True), ("attn.c_proj", "attn.c_proj", True),
                ("ln_2", "ln_2", False), ("mlp.c_fc", "mlp.c_fc", True), ("mlp.c_proj", "mlp.c_proj", True)]


def require_transformers():
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"importing a Hugging Face checkpoint needs transformers: {INSTALL_HINT}") from err
    return transformers


def chat_template(special_tokens: list[str]) -> str:
    """Jinja rendering of ChatTokenizer.chat/prompt: <|bos|> (<|user|> q <|assistant|> a <|end|>)* ...

    The user turn ends where the assistant's begins, so `add_generation_prompt=True` after a user
    message gives exactly `ChatTokenizer.prompt(q)`. Unlike the pipeline's token-level template, a
    string template lets message text that spells a special token become that token.
    """
    _, bos, user, assistant, end = special_tokens[:5]
    return ("{{ '" + bos + "' }}"
            "{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('a conversation alternates user and assistant messages, starting with the user') }}"
            "{% endif %}"
            "{% if message['role'] == 'user' %}{{ '" + user + "' + message['content'] }}"
            "{% else %}{{ '" + assistant + "' + message['content'] + '" + end + "' }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + assistant + "' }}{% endif %}")


# ---------------------------------------------------------------------------------------------- export

def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT-2's names and layouts (fp32, contiguous, no shared storage)."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    pos = sd["wpe.weight"] if cfg.pos_encoding == "learned" else model.pe.detach().float().cpu()
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": pos}
    for i in range(cfg.n_layer):
        for ours, theirs, transpose in BLOCK_PARAMS:
            w = sd[f"h.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w.t() if transpose else w
            out[f"transformer.h.{i}.{theirs}.bias"] = sd.get(f"h.{i}.{ours}.bias", torch.zeros(w.shape[0]))
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = sd.get("ln_f.bias", torch.zeros(cfg.n_embd))
    return {k: v.clone().contiguous() for k, v in out.items()}  # lm_head is tied to wte: GPT-2 omits it


def gpt2_config(cfg: GPTConfig, ids: dict[str, int]) -> dict:
    """config.json of GPT-2 with this model's shape; `ids` maps pad/bos/eos to token ids."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": TO_HF_ACTIVATION[cfg.activation],
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"], "dtype": "float32"}


def check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not an earlier export (it is replaced whole)."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "gpt_pipeline.json").is_file()):
        raise ValueError(f"{out} exists and is not an earlier export: choose an empty or new directory for --out")


def export_gpt2(model: GPT, tokenizer_file: str | Path, special_tokens: list[str], out: str | Path,
                provenance: dict | None = None) -> Path:
    """Write `model` and its tokenizer as a transformers GPT-2 directory `out` (replaced atomically)."""
    out = Path(out)
    check_out_dir(out)
    tok = Tokenizer.from_file(str(tokenizer_file))
    pad, bos, user, assistant, end = special_tokens[:5]
    ids = {"pad": tok.token_to_id(pad), "bos": tok.token_to_id(bos), "eos": tok.token_to_id(end)}
    missing = [t for t in (pad, bos, user, assistant, end) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{tokenizer_file} lacks the special tokens {missing} (tokenizer.special_tokens)")
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"{tokenizer_file} has {tok.get_vocab_size()} tokens, more than the model's "
                         f"{model.config.vocab_size}: the checkpoint was trained with another tokenizer")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": end, "pad_token": pad,
        "additional_special_tokens": [user, assistant], "model_max_length": model.config.block_size,
        "clean_up_tokenization_spaces": False, "chat_template": chat_template(special_tokens)}
    with atomic_dir(out) as tmp:
        save_file(gpt2_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", gpt2_config(model.config, ids))
        write_json(tmp / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                                                    "pad_token_id": ids["pad"]})
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        specials = ("bos_token", "eos_token", "pad_token", "additional_special_tokens")
        write_json(tmp / "special_tokens_map.json", {k: tokenizer_config[k] for k in specials})
        write_json(tmp / "gpt_pipeline.json", {"model": model.config.to_dict(), **(provenance or {})})
    return out


# ---------------------------------------------------------------------------------------------- import

def read_gpt2_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.init_from: {file} not found: not a transformers checkpoint directory")
    config = json.loads(file.read_text())
    if config.get("model_type") != "gpt2":
        raise ValueError(f"model.init_from: {file} has model_type {config.get('model_type')!r}; only GPT-2 "
                         "checkpoints (model_type gpt2) map onto the pipeline's GPT")
    return config


def check_gpt2_config(path: Path, cfg: GPTConfig) -> dict:
    """Refuse, naming the `model` field to change, a GPT-2 checkpoint that `cfg` cannot hold; return its config."""
    c = read_gpt2_config(path)
    where = f"{path / 'config.json'}"
    for ours, theirs in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd")):
        if c.get(theirs) != getattr(cfg, ours):
            raise ValueError(f"model.{ours} is {getattr(cfg, ours)} but {where} has {theirs}={c.get(theirs)}: "
                             f"set model.{ours}={c.get(theirs)}")
    activation = FROM_HF_ACTIVATION.get(c.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(f"{where} has activation_function {c.get('activation_function')!r}; the pipeline's GPT "
                         f"computes {sorted(FROM_HF_ACTIVATION)} only")
    if activation != cfg.activation:
        raise ValueError(f"model.activation is {cfg.activation!r} but {where} has activation_function "
                         f"{c.get('activation_function')!r}: set model.activation={activation}")
    if c.get("n_positions", 1024) < cfg.block_size:
        raise ValueError(f"model.block_size ({cfg.block_size}) exceeds {where}'s n_positions "
                         f"({c.get('n_positions')}): set model.block_size={c.get('n_positions')} or less")
    if c.get("vocab_size", 50257) > cfg.vocab_size:
        raise ValueError(f"{where} has vocab_size {c.get('vocab_size')}, more than the model's {cfg.vocab_size}: "
                         f"set model.vocab_size={c.get('vocab_size')} (or null with the imported tokenizer)")
    if cfg.pos_encoding != "learned":
        raise ValueError("model.pos_encoding is 'sinusoidal' but a GPT-2 checkpoint has a learned position "
                         "table: set model.pos_encoding=learned")
    if not cfg.bias:
        raise ValueError("model.bias is false but GPT-2 has biases: set model.bias=true")
    unsupported = {"n_inner": (None, 4 * cfg.n_embd), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,),
                   "tie_word_embeddings": (True,)}
    for key, allowed in unsupported.items():
        if c.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{where} has {key}={c[key]}; the pipeline's GPT supports only {allowed}")
    if abs(c.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"{where} has layer_norm_epsilon={c['layer_norm_epsilon']}; the pipeline's GPT uses "
                         f"{LAYER_NORM_EPS}")
    return c


def check_imported_tokenizer(path: Path, tokenizer: Tokenizer, special_tokens: list[str]) -> None:
    """Refuse to start from DIR's weights with a tokenizer other than DIR's (plus the special tokens)."""
    if tokenizer.get_vocab() != import_tokenizer(path, special_tokens).get_vocab():
        raise ValueError(f"model.init_from: the workspace's tokenizer is not {path / 'tokenizer.json'}: rerun the "
                         "`tokenizer` stage with the same model.init_from (dvc repro tokenizer) so the corpus is "
                         "tokenized with the ids the imported weights know")


@torch.no_grad()
def load_gpt2_weights(model: GPT, path: Path) -> GPT:
    """Copy DIR's GPT-2 weights into `model` (checked with `check_gpt2_config` first); returns `model`."""
    check_gpt2_config(path, model.config)
    transformers = require_transformers()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    theirs = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    cfg = model.config
    model.wte.weight[:theirs["wte.weight"].shape[0]] = theirs["wte.weight"]
    model.wpe.weight.copy_(theirs["wpe.weight"][:cfg.block_size])
    params = dict(model.named_parameters())
    for i in range(cfg.n_layer):
        for ours, name, transpose in BLOCK_PARAMS:
            for kind in ("weight", "bias"):
                w = theirs[f"h.{i}.{name}.{kind}"]
                params[f"h.{i}.{ours}.{kind}"].copy_(w.t() if transpose and kind == "weight" else w)
    model.ln_f.weight.copy_(theirs["ln_f.weight"])
    model.ln_f.bias.copy_(theirs["ln_f.bias"])
    return model


def export_checkpoint(name: str, out: str | Path, special_tokens: list[str], producer: str | None = None) -> Path:
    """Export checkpoint `name` (e.g. aligned) with the workspace's tokenizer."""
    tok = load_tokenizer(special_tokens)
    model, meta = load_gpt(name, tok.sha256, producer)
    provenance = {"checkpoint": name, "tokenizer_sha256": tok.sha256,
                  **{k: meta.get(k) for k in ("step", "run_id", "git_commit", "git_dirty", "created")}}
    return export_gpt2(model, TOKENIZER_FILE, special_tokens, out, provenance)
