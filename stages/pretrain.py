"""Stage `pretrain`: a GPT from scratch on the pretraining text, next-token loss."""
from __future__ import annotations

import math

import lightning as L
from omegaconf import DictConfig

from pipeline.checkpoint import save_checkpoint
from pipeline.context import DATA_DIR, checkpoint_meta, gpt_config, load_tokenizer, mean_of
from pipeline.data.datamodules import PretrainData
from pipeline.model import GPT
from pipeline.objectives.base import validate_optim
from pipeline.objectives.lm import LanguageModeling
from pipeline.runner import main
from pipeline.train import fit


def run(cfg: DictConfig) -> dict:
    p = cfg.pretrain
    validate_optim(p.optim, "pretrain")
    tok = load_tokenizer(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    model = GPT(gpt_config(cfg, tok))
    data = PretrainData(DATA_DIR, tok, model.config.block_size, p.batch_size, cfg.seed)
    module = LanguageModeling(model, p.optim, p.max_steps)
    _, curves, final = fit(module, data, cfg, "pretrain", max_steps=p.max_steps, val_every=p.val_every,
                           val_batches=p.val_batches, grad_clip=p.grad_clip, accumulate=p.accumulate)
    metrics = {"val_loss": final["val/loss"], "val_ppl": math.exp(final["val/loss"]),
               "train_loss": curves.train[-1]["train/loss"], "first_train_loss": curves.train[0]["train/loss"],
               "ln_vocab": math.log(tok.vocab_size), "tokens_per_sec": mean_of(curves.train, "train/tokens_per_sec"),
               "tokens_seen": p.max_steps * p.batch_size * p.accumulate * model.config.block_size,
               "n_params": model.num_params()}
    save_checkpoint("pretrain", model, checkpoint_meta(cfg, tok, model, "gpt", step=p.max_steps, metrics=metrics))
    return metrics


if __name__ == "__main__":
    main("pretrain")
