"""Stage `reward`: a Bradley-Terry reward model (SFT backbone + scalar head) on preference pairs."""
from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from omegaconf import DictConfig

from pipeline.checkpoint import load_gpt, save_checkpoint
from pipeline.context import DATA_DIR, checkpoint_meta, load_tokenizer
from pipeline.data.datamodules import PreferenceData
from pipeline.objectives.base import validate_optim
from pipeline.objectives.reward import RewardModeling, ScalarHead
from pipeline.runner import main
from pipeline.train import fit


@torch.no_grad()
def accuracy_by_corruption(model: ScalarHead, data: PreferenceData) -> dict[str, float]:
    """Held-out pairwise accuracy per corruption type (easy ones vs near misses)."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, pair in zip(data.val_rows, data.val_set):
        batch = data.collate([pair])
        r = model(batch["input_ids"].to(model.head.weight.device), batch["last"].to(model.head.weight.device))
        hits[row["corruption"]].append(bool(r[0] > r[1]))
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


def run(cfg: DictConfig) -> dict:
    r = cfg.reward
    validate_optim(r.optim, "reward")
    tok = load_tokenizer(cfg)
    backbone, _ = load_gpt("sft", tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    model = ScalarHead(backbone.train())
    data = PreferenceData(DATA_DIR, tok, backbone.config.block_size, r.batch_size, cfg.seed, r.val_fraction)
    module = RewardModeling(model, r.optim, r.max_steps)
    _, curves, final = fit(module, data, cfg, "reward", max_steps=r.max_steps, val_every=r.val_every,
                           val_batches=r.val_batches, grad_clip=r.grad_clip)
    metrics = {"margin": final["val/margin"],
               "mean_reward": final["val/mean_reward"], "val_loss": final["val/loss"],
               "train_loss": curves.train[-1]["train/loss"], "held_out_pairs": len(data.val_rows),
               **accuracy_by_corruption(model, data)}
    save_checkpoint("reward", model, checkpoint_meta(cfg, tok, backbone, "reward", step=r.max_steps, metrics=metrics))
    return metrics


if __name__ == "__main__":
    main("reward")
