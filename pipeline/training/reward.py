"""The reward model: its training objective (the Bradley-Terry loss on preference pairs, TRL's metric names),
its on-policy pairs, and the reward stage's run.

P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the loss is -log of it (Ouyang et al. 2022).
Metrics: accuracy (share of pairs ranked right), margin (mean r_c - r_r), mean_reward. The model is
`pipeline.model.heads.ScalarHead`.

On-policy pairs: as in InstructGPT, where labelers rank the model's own outputs, `on_policy_pairs`
samples the SFT policy on training prompts and pairs each wrong sample (judged by the generator's
checker, the reliable labeler here) with the correct answer, so the reward model (and DPO) also learns
the mistakes the policy actually makes, not only the synthetic corruptions.

With `peft.stages` listing reward, the backbone trains LoRA adapters and the scalar head trains whole; the
checkpoint holds them merged (pipeline.model.lora).
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import track

from pipeline import paths
from pipeline.config.training import OnPolicyConfig, OptimConfig
from pipeline.data.datamodules import PreferenceData
from pipeline.data.splits import load_split
from pipeline.data.tasks import check
from pipeline.data.tokenizer import ChatTokenizer, load_tokenizer
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.model import lora
from pipeline.model.gpt import GPT
from pipeline.model.handoff import checkpoint_meta, load_gpt, save_checkpoint
from pipeline.model.heads import ScalarHead
from pipeline.training.objective import Objective
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from pipeline.config.root import Config
    from pipeline.registry import StageSpec


def pairwise_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = r_chosen - r_rejected
    return {"loss": -F.logsigmoid(margin).mean(), "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean(), "mean_reward": torch.cat([r_chosen, r_rejected]).mean()}


class RewardModeling(Objective):
    """Batches hold both sides of each pair, chosen first: input_ids (2B,T), last (2B,), response_mask (2B,T)."""

    def __init__(self, model: ScalarHead, optim: OptimConfig, max_steps: int) -> None:
        super().__init__(optim, max_steps)
        self.model = model

    def _stats(self, batch: dict) -> dict[str, torch.Tensor]:
        r = self.model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"])
        n = r.size(0) // 2
        return pairwise_stats(r[:n], r[n:])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = self._stats(batch)
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "accuracy"))
        self.log_throughput(batch["input_ids"].numel(), batch_idx)
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for k, v in self._stats(batch).items():
            self.log(f"val/{k}", v, prog_bar=k == "accuracy")


@torch.no_grad()
def on_policy_pairs(policy: GPT, tok: ChatTokenizer, rows: list[dict], samples: int, max_new_tokens: int,
                    temperature: float, seed: int, batch_size: int = 256) -> list[dict]:
    """Preference rows (chosen = reference answer, rejected = a wrong sample of `policy`), one per distinct error."""
    g = torch.Generator(device=policy.wte.weight.device).manual_seed(seed)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    repeated = [r for r in rows for _ in range(samples)]
    out, seen = [], set()
    for i in track(range(0, len(repeated), batch_size), description="sampling on-policy pairs", transient=True):
        chunk = repeated[i:i + batch_size]
        responses = generate(policy, [tok.prompt(r["prompt"]) for r in chunk], cfg, stop_id=tok.end_id,
                             pad_id=tok.pad_id, generator=g)
        for row, resp in zip(chunk, responses):
            text = tok.decode(tok.strip_response(resp))
            ended = tok.end_id in resp
            if (ended and check(row["answer"], text)) or (row["key"], text, ended) in seen:
                continue
            seen.add((row["key"], text, ended))
            out.append({"prompt": row["prompt"], "chosen": row["answer"], "rejected": text, "rejected_has_end": ended,
                        "corruption": "on_policy", "family": row["family"], "key": row["key"]})
    return out


def sample_on_policy(policy: GPT, tok: ChatTokenizer, cfg: OnPolicyConfig, seed: int) -> list[dict]:
    """`on_policy_pairs` from the first `cfg.prompts` RL prompts (none when it is 0)."""
    if not cfg.prompts:
        return []
    rows = load_split(paths.PREPARED, "rl_prompts")[:cfg.prompts]
    return on_policy_pairs(policy.eval(), tok, rows, cfg.samples, cfg.max_new_tokens, cfg.temperature, seed)


def on_policy_splits(cfg: OnPolicyConfig) -> tuple[str, ...]:
    """The prepared splits a preference stage reads: the pairs, and RL prompts when it samples on-policy pairs."""
    return ("preference", "rl_prompts") if cfg.prompts > 0 else ("preference",)


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


def train_reward_model(cfg: Config, spec: StageSpec) -> dict:
    """The stage's `gpt` checkpoint plus a scalar head, trained on preference pairs; saved as its checkpoint."""
    r = cfg.reward
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    backbone, _ = load_gpt(spec.checkpoint("gpt"), tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    extra = sample_on_policy(backbone, tok, r.on_policy, cfg.seed)
    model = ScalarHead(backbone.train(), likelihood_term=r.likelihood_term)
    adapters = lora.applies(cfg.peft, spec.name)
    if adapters:  # LoRA on the backbone only: the head (and lm_scale) train whole, the likelihood copy stays frozen
        model.backbone = lora.add_adapters(model.backbone, cfg.peft)
    data = PreferenceData(paths.PREPARED, tok, backbone.config.block_size, r.batch_size, cfg.seed, r.val_fraction,
                          extra)
    module = RewardModeling(model, r.optim, r.max_steps)
    _, curves, final = fit(module, data, cfg, spec, max_steps=r.max_steps, val_every=r.val_every,
                           val_batches=r.val_batches, grad_clip=r.grad_clip, single_device=True)
    metrics = {"margin": final["val/margin"],
               "mean_reward": final["val/mean_reward"], "val_loss": final["val/loss"],
               "train_loss": curves.train[-1]["train/loss"], "held_out_pairs": len(data.val_rows),
               "on_policy_pairs": len(extra),
               "lm_scale": model.lm_scale.item() if model.likelihood_term else 0.0,
               **accuracy_by_corruption(model, data), **curves.totals}
    trained = {}
    if adapters:  # only then: the meta and metrics of full finetuning stay as they were
        metrics.update(lora.param_counts(model))
        trained = lora.adapter_meta(cfg.peft, model)
        model.backbone = backbone = lora.merge(model.backbone)  # a plain reward model, as PPO loads it
    save_checkpoint(spec.writes[0].name, model, checkpoint_meta(cfg, tok, backbone, "reward", step=r.max_steps,
                                                               likelihood_term=r.likelihood_term, metrics=metrics,
                                                               **trained))
    return metrics
