"""Stage `sft`: finetune the pretrained GPT on chat conversations, loss on answers only."""
from __future__ import annotations

import math

import lightning as L
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt
from pipeline.context import DATA_DIR, load_tokenizer, mean_of
from pipeline.data.datamodules import ChatData
from pipeline.objectives.optim_config import validate_optim
from pipeline.objectives.sft import SupervisedFinetuning
from pipeline.runner import main
from pipeline.train import fit, prepare_model, save_trained_gpt


def finetune(cfg: DictConfig, start: str, out: str, steps: int, optim: DictConfig | None = None, **meta) -> dict:
    """Train checkpoint `start` with the SFT recipe (`cfg.sft`, or `optim` in its place) for `steps` steps;
    save it as `out`."""
    s = cfg.sft
    optim = optim or s.optim
    validate_optim(optim, "sft")
    tok = load_tokenizer(cfg)
    model, _ = load_gpt(start, tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    data = ChatData(DATA_DIR, tok, model.config.block_size, s.batch_size, cfg.seed)
    module = SupervisedFinetuning(prepare_model(model.train(), cfg), optim, steps)
    trainer, curves, final = fit(module, data, cfg, out, max_steps=steps, val_every=min(s.val_every, steps),
                                 val_batches=s.val_batches, grad_clip=s.grad_clip)
    metrics = {"val_loss": final["val/loss"], "val_ppl": math.exp(final["val/loss"]),
               "train_loss": curves.train[-1]["train/loss"], "first_train_loss": curves.train[0]["train/loss"],
               "tokens_per_sec": mean_of(curves.train, "train/tokens_per_sec"), **curves.totals}
    save_trained_gpt(trainer, module, out, cfg, tok, step=steps, metrics=metrics, **meta)
    return metrics


def run(cfg: DictConfig) -> dict:
    return finetune(cfg, "pretrain", "sft", cfg.sft.max_steps)


if __name__ == "__main__":
    main("sft")
