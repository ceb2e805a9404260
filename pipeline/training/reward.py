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
from contextlib import nullcontext
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F

from pipeline import paths
from pipeline.config.training import OnPolicyConfig, OptimConfig
from pipeline.data.datamodules import PreferenceData
from pipeline.data.packing import padding_share, sequence_tokens
from pipeline.data.splits import load_split
from pipeline.data.tasks import check
from pipeline.data.tokenizer import ChatTokenizer, load_tokenizer
from pipeline.inference.sampling import SamplingConfig, chunk_seed, generate
from pipeline.logs import progress
from pipeline.model import lora
from pipeline.model.gpt import GPT
from pipeline.model.handoff import checkpoint_meta, load_gpt, save_checkpoint
from pipeline.model.heads import ScalarHead
from pipeline.model.logprobs import packed_keys
from pipeline.training.curves import mean_of
from pipeline.training.objective import Objective
from pipeline.training.parallel import gather_shares, shares, trained_module
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
        r = self.model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"], **packed_keys(batch))
        n = r.size(0) // 2
        return pairwise_stats(r[:n], r[n:])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = self._stats(batch)
        for k, v in stats.items():  # every rank's batch holds as many pairs: the mean over ranks is the batch's
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "accuracy"), sync_dist=True)
        self.log_throughput(sequence_tokens(batch), batch_idx)  # real tokens, padded or packed alike
        self.log("train/padding", padding_share(batch), sync_dist=True)  # the mean over ranks
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        r = self.model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"], **packed_keys(batch))
        n = r.size(0) // 2
        margin = r[:n] - r[n:]
        self.accumulate("val", {"loss": -F.logsigmoid(margin), "accuracy": (margin > 0).float(), "margin": margin,
                                "mean_reward": (r[:n] + r[n:]) / 2}, batch["weight"])


@torch.no_grad()
def on_policy_pairs(policy: GPT, tok: ChatTokenizer, rows: list[dict], samples: int, max_new_tokens: int,
                    temperature: float, seed: int, batch_size: int = 256) -> list[dict]:
    """Preference rows (chosen = reference answer, rejected = a wrong sample of `policy`), one per distinct error.

    The `samples` x `rows` draws are cut into chunks of `batch_size`, each sampled with its own seed
    (`chunk_seed`) by one rank (pipeline.training.parallel.shares) on the policy's device; every rank gets the
    rows of all chunks, in chunk order, so the pairs are the same on any number of devices."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    repeated = [r for r in rows for _ in range(samples)]
    starts = range(0, len(repeated), batch_size)
    device = policy.wte.weight.device
    mine: dict[int, list[tuple[str, bool]]] = {}
    for chunk in progress(shares(len(starts)), "sampling on-policy pairs", transient=True):
        rows_in = repeated[starts[chunk]:starts[chunk] + batch_size]
        g = torch.Generator(device=device).manual_seed(chunk_seed(seed, chunk))
        responses = generate(policy, [tok.prompt(r["prompt"]) for r in rows_in], cfg, stop_id=tok.end_id,
                             pad_id=tok.pad_id, generator=g)
        mine[chunk] = [(tok.decode(tok.strip_response(resp)), tok.end_id in resp) for resp in responses]
    out, seen = [], set()
    for row, (text, ended) in zip(repeated, (s for chunk in gather_shares(mine, len(starts)) for s in chunk)):
        if (ended and check(row["answer"], text)) or (row["key"], text, ended) in seen:
            continue
        seen.add((row["key"], text, ended))
        out.append({"prompt": row["prompt"], "chosen": row["answer"], "rejected": text, "rejected_has_end": ended,
                    "corruption": "on_policy", "family": row["family"], "key": row["key"]})
    return out


def sample_on_policy(policy: GPT, tok: ChatTokenizer, cfg: OnPolicyConfig, seed: int,
                     trainer: L.Trainer | None = None) -> list[dict]:
    """`on_policy_pairs` from the first `cfg.prompts` RL prompts (none when it is 0). With `trainer` (called from
    the datamodule's setup), on its device, in its precision, each rank sampling its share."""
    if not cfg.prompts:
        return []
    rows = load_split(paths.PREPARED, "rl_prompts")[:cfg.prompts]
    was_training = policy.training
    context = nullcontext()
    if trainer is not None:
        policy.to(trainer.strategy.root_device)
        trainer.precision_plugin.convert_module(policy)  # bf16-true weights as training will have them
        context = trainer.precision_plugin.forward_context()
    with context:
        pairs = on_policy_pairs(policy.eval(), tok, rows, cfg.samples, cfg.max_new_tokens, cfg.temperature, seed,
                                cfg.batch_size)
    policy.train(was_training)
    return pairs


def on_policy_splits(cfg: OnPolicyConfig) -> tuple[str, ...]:
    """The prepared splits a preference stage reads: the pairs, and RL prompts when it samples on-policy pairs."""
    return ("preference", "rl_prompts") if cfg.prompts > 0 else ("preference",)


@torch.no_grad()
def accuracy_by_corruption(model: ScalarHead, data: PreferenceData) -> dict[str, float]:
    """Held-out pairwise accuracy per corruption type (easy ones vs near misses)."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in progress(range(0, len(data.val_set), 128), "scoring held-out pairs", transient=True):
        batch = data.collate(data.val_set[i:i + 128])
        batch = {k: v.to(model.head.weight.device) for k, v in batch.items()}
        r = model(batch["input_ids"], batch["last"], response_mask=batch["response_mask"], **packed_keys(batch))
        n = r.size(0) // 2
        for row, win in zip(data.val_rows[i:i + 128], (r[:n] > r[n:]).tolist()):
            hits[row["corruption"]].append(win)
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


def train_reward_model(cfg: Config, spec: StageSpec) -> dict:
    """The stage's `gpt` checkpoint plus a scalar head, trained on preference pairs under the configured strategy;
    saved as its checkpoint by global rank 0, which also scores the held-out pairs (the other ranks return {})."""
    r = cfg.reward
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    backbone, _ = load_gpt(spec.checkpoint("gpt"), tok.sha256)
    L.seed_everything(cfg.seed, verbose=False)
    adapters = lora.applies(cfg.peft, spec.name)

    def reward_model(gpt: GPT) -> ScalarHead:
        model = ScalarHead(gpt.train(), likelihood_term=r.likelihood_term)
        if adapters:  # LoRA on the backbone only: the head (and lm_scale) train whole, the likelihood copy frozen
            model.backbone = lora.add_adapters(model.backbone, cfg.peft)
        return model

    def rebuild(state: dict[str, torch.Tensor]) -> ScalarHead:  # the gathered weights of a sharded run
        model = reward_model(GPT(backbone.config))
        model.load_state_dict(state)
        return model

    model = reward_model(backbone)  # with adapters, `backbone` holds them too: zero at the start, as sampled
    data = PreferenceData(paths.PREPARED, tok, backbone.config.block_size, r.batch_size, cfg.seed, r.val_fraction,
                          lambda trainer: sample_on_policy(backbone, tok, r.on_policy, cfg.seed, trainer),
                          packing=r.packing)
    module = RewardModeling(model, r.optim, r.max_steps)
    trainer, curves, final = fit(module, data, cfg, spec, max_steps=r.max_steps, val_every=r.val_every,
                                 val_batches=r.val_batches, grad_clip=r.grad_clip)
    model = trained_module(trainer, module, "model", rebuild)
    if model is None:
        return {}
    with trainer.precision_plugin.forward_context():
        held_out = accuracy_by_corruption(model.to(trainer.strategy.root_device), data)
    model.cpu()
    metrics = {"margin": final["val/margin"],
               "mean_reward": final["val/mean_reward"], "val_loss": final["val/loss"],
               "train_loss": curves.train[-1]["train/loss"], "held_out_pairs": len(data.val_rows),
               "on_policy_pairs": len(data.extra_rows), "padding": mean_of(curves.train, "train/padding"),
               "lm_scale": model.lm_scale.item() if model.likelihood_term else 0.0,
               **held_out, **curves.totals}
    trained = {}
    if adapters:  # only then: the meta and metrics of full finetuning stay as they were
        metrics.update(lora.param_counts(model))
        trained = lora.adapter_meta(cfg.peft, model)
        model.backbone = lora.merge(model.backbone)  # a plain reward model, as PPO loads it
    meta = checkpoint_meta(cfg, tok, model.backbone, "reward", step=trainer.global_step,  # early stopping may end it
                           likelihood_term=r.likelihood_term, metrics=metrics, **trained)
    save_checkpoint(spec.writes[0].name, model, meta)
    return metrics
