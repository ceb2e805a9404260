"""Next-token language modeling: the pretraining objective, SFT's (loss on the assistant's replies only), and
the pretrain, sft and sft_control runs built on them.

loss = mean over predicted positions of -log p(x_{t+1} | x_{<=t}); positions whose label is -100
(prompt tokens in SFT, padding) are skipped. The labels the SFT datamodule builds are IGNORE_INDEX on
`<|bos|><|user|> question <|assistant|>` and real on `answer <|end|>`, so the model learns to answer and
to stop, not to imitate questions.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F

from pipeline import paths
from pipeline.config.training import OptimConfig
from pipeline.data.datamodules import ChatData, PretrainData
from pipeline.data.packing import padding_share
from pipeline.data.tokenizer import IGNORE_INDEX, load_tokenizer
from pipeline.io import write_json
from pipeline.model import lora
from pipeline.model.gpt import GPT
from pipeline.model.handoff import checkpoint_meta, load_gpt, save_checkpoint
from pipeline.training.curves import mean_of
from pipeline.training.objective import Objective
from pipeline.training.trainer import fit, prepare_model, save_trained_gpt

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class LanguageModeling(Objective):
    """Trains `model` on batches {"input_ids": (B,T), "labels": (B,T)} with labels already shifted."""

    def __init__(self, model: GPT, optim: OptimConfig, max_steps: int) -> None:
        super().__init__(optim, max_steps)
        self.model = model
        self.flops_per_token = model.flops_per_token()

    def step_loss(self, batch: dict) -> torch.Tensor:
        packed = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}  # packed rows
        return lm_loss(self.model(batch["input_ids"], **packed), batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss under DDP
        self.log_throughput((batch["labels"] != IGNORE_INDEX).sum(), batch_idx)
        if "attention_mask" in batch:  # chat batches (pretraining rows hold no padding)
            self.log("train/padding", padding_share(batch), sync_dist=True)  # the mean over ranks
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.step_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", math.e ** loss.clamp(max=20), sync_dist=True)
        tokens_per_byte = getattr(self.trainer.datamodule, "val_tokens_per_byte", None)
        if tokens_per_byte:  # bits per byte: comparable across tokenizers (nats/token -> bits/byte)
            self.log("val/bpb", loss / math.log(2) * tokens_per_byte, sync_dist=True)


class SupervisedFinetuning(LanguageModeling):
    """Language modeling on chat conversations; also logs how many answer tokens each batch trains on."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/answer_tokens", float((batch["labels"] != IGNORE_INDEX).sum()))
        return loss


def pretrain(cfg: Config, spec: StageSpec) -> dict:
    """A GPT from scratch (or from `model.init_from=hf:DIR`) on the pretraining text; saves checkpoint `pretrain`.

    With `model.init_from` and `pretrain.max_steps=0` nothing is trained: the imported weights are measured on
    the validation text and handed on unchanged."""
    from pipeline.interop.hf import model_shape
    p = cfg.pretrain
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    L.seed_everything(cfg.seed, verbose=False)
    model = GPT(model_shape(cfg.model, tok.vocab_size))
    source = cfg.model.init_dir()
    if source is not None:  # a transformers checkpoint; checked against the workspace's tokenizer first
        from pipeline.interop.hf import check_imported_tokenizer, load_pretrained
        check_imported_tokenizer(source, tok.tok, cfg.tokenizer.special_tokens)
        load_pretrained(model, source)
    block = model.config.block_size
    data = PretrainData(tok, block, p.batch_size, cfg.seed)
    module = LanguageModeling(prepare_model(model, cfg), p.optim, p.max_steps)
    val_every = max(1, min(p.val_every, p.max_steps))  # max_steps=0: fit trains nothing, then validates
    trainer, curves, final = fit(module, data, cfg, spec, max_steps=p.max_steps, val_every=val_every,
                                 val_batches=p.val_batches, grad_clip=p.grad_clip, accumulate=p.accumulate,
                                 global_batch_tokens=p.global_batch_tokens, micro_batch_tokens=p.batch_size * block)
    batch_tokens = p.batch_size * block * trainer.accumulate_grad_batches * trainer.world_size
    first, last = (curves.train[0], curves.train[-1]) if curves.train else ({}, {})
    metrics = {"val_loss": final["val/loss"], "val_ppl": math.exp(final["val/loss"]), "val_bpb": final.get("val/bpb"),
               "train_loss": last.get("train/loss"), "first_train_loss": first.get("train/loss"),
               "ln_vocab": math.log(tok.vocab_size), "tokens_per_sec": mean_of(curves.train, "train/tokens_per_sec"),
               "mfu": mean_of(curves.train, "train/mfu"), "global_batch_tokens": batch_tokens,
               "accumulate": trainer.accumulate_grad_batches, "world_size": trainer.world_size,
               "tokens_seen": trainer.global_step * batch_tokens, "n_params": model.num_params(), **curves.totals}
    if source is not None:
        metrics["init_from"] = str(source)
    save_trained_gpt(trainer, module, spec.writes[0].name, cfg, tok, step=trainer.global_step, metrics=metrics)
    return metrics


def finetune(cfg: Config, spec: StageSpec, steps: int, optim: OptimConfig | None = None, **meta) -> dict:
    """Train the stage's `gpt` checkpoint with the SFT recipe (`cfg.sft`, or `optim` in its place) for `steps`
    steps; save it as the stage's checkpoint.

    With `peft.stages` listing sft, the recipe trains LoRA adapters (pipeline.model.lora), for sft_control too
    (it extends the SFT run, so it trains as SFT did); the checkpoint holds them merged."""
    s = cfg.sft
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    model, _ = load_gpt(spec.checkpoint("gpt"), tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    adapters = lora.applies(cfg.peft, "sft")
    if adapters:
        model = lora.add_adapters(model, cfg.peft)
    data = ChatData(paths.PREPARED, tok, model.config.block_size, s.batch_size, cfg.seed, packing=s.packing)
    module = SupervisedFinetuning(prepare_model(model.train(), cfg), optim or s.optim, steps)
    trainer, curves, final = fit(module, data, cfg, spec, max_steps=steps, val_every=min(s.val_every, steps),
                                 val_batches=s.val_batches, grad_clip=s.grad_clip)
    metrics = {"val_loss": final["val/loss"], "val_ppl": math.exp(final["val/loss"]),
               "train_loss": curves.train[-1]["train/loss"], "first_train_loss": curves.train[0]["train/loss"],
               "tokens_per_sec": mean_of(curves.train, "train/tokens_per_sec"),
               "padding": mean_of(curves.train, "train/padding"), **curves.totals}
    if adapters:  # only then: the meta and metrics of full finetuning stay as they were
        metrics.update(lora.param_counts(module.model))
        meta.update(lora.adapter_meta(cfg.peft, module.model))
    save_trained_gpt(trainer, module, spec.writes[0].name, cfg, tok, step=trainer.global_step, metrics=metrics,
                     **meta)
    return metrics


def finetune_further(cfg: Config, spec: StageSpec, steps: int, matches: str) -> dict:
    """The same-compute control: the SFT checkpoint trained `steps` more steps (as many as alignment gave
    the policy) on the SFT data and batch size.

    The SFT run is extended, not restarted: the steps continue at the learning rate SFT ended on
    (`sft.optim.lr * min_lr_ratio`), constant, without a new warmup, since a fresh warmup to the peak
    rate would shake the model and make the control look worse than more SFT really is.
    """
    o = cfg.sft.optim
    extended = o.model_copy(update={"lr": o.lr * o.min_lr_ratio, "warmup_steps": 0, "min_lr_ratio": 1.0})
    if steps == 0:  # the aligned weights had no update (align.keep=best kept the start): the control is SFT itself
        tok = load_tokenizer(cfg.tokenizer.special_tokens)
        model, _ = load_gpt(spec.checkpoint("gpt"), tok.sha256)
        save_checkpoint(spec.writes[0].name, model, checkpoint_meta(cfg, tok, model, "gpt", step=0, matches=matches))
        live = paths.live_dir(spec.name)  # the live files DVC expects of a training stage: no step to show
        (live / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        write_json(live / "metrics.json", {"step": 0})
        return {"steps": 0, "matches": matches, "lr": float(extended.lr)}
    metrics = finetune(cfg, spec, steps, optim=extended, matches=matches)
    return {"steps": steps, "matches": matches, "lr": float(extended.lr), **metrics}
