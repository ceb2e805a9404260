"""Stage `reward`: a Bradley-Terry reward model (SFT backbone + scalar head) on preference pairs."""
from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from omegaconf import DictConfig
from rich.progress import track

from pipeline.checkpoint import load_gpt, save_checkpoint
from pipeline.context import DATA_DIR, checkpoint_meta, load_tokenizer
from pipeline.data.datamodules import PreferenceData
from pipeline.data.prepare import load_split
from pipeline.objectives.optim_config import validate_optim
from pipeline.objectives.reward import RewardModeling
from pipeline.objectives.reward_model import ScalarHead, on_policy_pairs
from pipeline.runner import main
from pipeline.train import fit


@torch.no_grad()
def accuracy_by_corruption(model: ScalarHead, data: PreferenceData) -> dict[str, float]:
    """Held-out pairwise accuracy per corruption type (easy ones vs near misses)."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in track(range(0, len(data.val_set), 128), description="scoring held-out pairs", transient=True):
        batch = data.collate(data.val_set[i:i + 128])
        batch = {k: v.to(model.head.weight.device) for k, v in batch.items()}
        r = model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"])
        n = r.size(0) // 2
        for row, win in zip(data.val_rows[i:i + 128], (r[:n] > r[n:]).tolist()):
            hits[row["corruption"]].append(win)
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


def run(cfg: DictConfig) -> dict:
    r = cfg.reward
    validate_optim(r.optim, "reward")
    tok = load_tokenizer(cfg)
    backbone, _ = load_gpt("sft", tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    op = r.on_policy
    extra = on_policy_pairs(backbone.eval(), tok, load_split(DATA_DIR, "rl_prompts")[:op.prompts], op.samples,
                            op.max_new_tokens, op.temperature, cfg.seed) if op.prompts else []
    model = ScalarHead(backbone.train(), likelihood_term=bool(r.likelihood_term))
    data = PreferenceData(DATA_DIR, tok, backbone.config.block_size, r.batch_size, cfg.seed, r.val_fraction, extra)
    module = RewardModeling(model, r.optim, r.max_steps)
    _, curves, final = fit(module, data, cfg, "reward", max_steps=r.max_steps, val_every=r.val_every,
                           val_batches=r.val_batches, grad_clip=r.grad_clip, single_device=True)
    metrics = {"margin": final["val/margin"],
               "mean_reward": final["val/mean_reward"], "val_loss": final["val/loss"],
               "train_loss": curves.train[-1]["train/loss"], "held_out_pairs": len(data.val_rows),
               "on_policy_pairs": len(extra),
               "lm_scale": model.lm_scale.item() if model.likelihood_term else 0.0,
               **accuracy_by_corruption(model, data), **curves.totals}
    save_checkpoint("reward", model, checkpoint_meta(cfg, tok, backbone, "reward", step=r.max_steps,
                                                   likelihood_term=bool(r.likelihood_term), metrics=metrics))
    return metrics


if __name__ == "__main__":
    main("reward")
