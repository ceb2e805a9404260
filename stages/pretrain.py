"""Stage `pretrain`: a GPT from scratch (or from `model.init_from=hf:DIR`) on the pretraining text, next-token loss."""
from __future__ import annotations

import math

import lightning as L
from omegaconf import DictConfig

from pipeline.context import gpt_config, load_tokenizer, mean_of
from pipeline.data.datamodules import PretrainData
from pipeline.hf import check_imported_tokenizer, init_source, load_gpt2_weights
from pipeline.model import GPT
from pipeline.objectives.lm import LanguageModeling
from pipeline.objectives.optim_config import validate_optim
from pipeline.runner import main
from pipeline.train import fit, prepare_model, save_trained_gpt


def run(cfg: DictConfig) -> dict:
    p = cfg.pretrain
    validate_optim(p.optim, "pretrain")
    tok = load_tokenizer(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    model = GPT(gpt_config(cfg, tok))
    source = init_source(cfg.model.get("init_from"))
    if source is not None:  # a transformers GPT-2 checkpoint; checked against `model` and the tokenizer first
        check_imported_tokenizer(source, tok.tok, list(cfg.tokenizer.special_tokens))
        load_gpt2_weights(model, source)
    block = model.config.block_size
    data = PretrainData(tok, block, p.batch_size, cfg.seed)
    module = LanguageModeling(prepare_model(model, cfg), p.optim, p.max_steps)
    trainer, curves, final = fit(module, data, cfg, "pretrain", max_steps=p.max_steps, val_every=p.val_every,
                                 val_batches=p.val_batches, grad_clip=p.grad_clip, accumulate=p.accumulate,
                                 global_batch_tokens=p.get("global_batch_tokens"), micro_batch_tokens=p.batch_size * block)
    batch_tokens = p.batch_size * block * trainer.accumulate_grad_batches * trainer.world_size
    metrics = {"val_loss": final["val/loss"], "val_ppl": math.exp(final["val/loss"]), "val_bpb": final.get("val/bpb"),
               "train_loss": curves.train[-1]["train/loss"], "first_train_loss": curves.train[0]["train/loss"],
               "ln_vocab": math.log(tok.vocab_size), "tokens_per_sec": mean_of(curves.train, "train/tokens_per_sec"),
               "mfu": mean_of(curves.train, "train/mfu"), "global_batch_tokens": batch_tokens,
               "accumulate": trainer.accumulate_grad_batches, "world_size": trainer.world_size,
               "tokens_seen": p.max_steps * batch_tokens, "n_params": model.num_params(), **curves.totals}
    save_trained_gpt(trainer, module, "pretrain", cfg, tok, step=p.max_steps, metrics=metrics)
    return metrics


if __name__ == "__main__":
    main("pretrain")
