"""The measurements `evaluate` takes of every checkpoint, on the same prompts.

- val_loss / perplexity: next-token loss on the eval split's answers (+ end token) in chat format.
- exact_match: greedy answers to the zero-shot prompt checked by the generator's own checker (strict:
  the reply must be the bare answer); per family too.
- exact_match_fewshot: the same with k solved training problems as earlier turns (strict check).
- exact_match_cot: asked for steps (the chain-of-thought template); graded on the answer after the
  reply's last `Answer:`. Each of the three also on the harder held-out split (`..._hard`).
- reward, kl_to_sft: the two terms of the RLHF objective E_{y~pi}[r(x, y)] - beta * KL(pi || sft),
  measured on responses sampled from the checkpoint (temperature 1): the mean reward-model score, and
  at every generated position the exact KL(checkpoint || SFT) over the whole vocabulary, summed over
  the response and averaged over prompts. `exact_match_sampled` checks those same samples.
- reward_greedy: the reward-model score of the greedy answers.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import track

from pipeline.config.evaluate import EvaluateConfig
from pipeline.data.tasks import check, final_answer
from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer
from pipeline.inference.prompting import FewShotPool, PromptTemplates, few_shot_prompt
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.inference.sequences import build_sequences, response_positions
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def batches(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@torch.no_grad()
def answer_loss(model: GPT, tok: ChatTokenizer, rows: list[dict], batch_size: int) -> float:
    total, count = 0.0, 0
    for chunk in batches(rows, batch_size):
        pairs = [tok.conversation(r["prompt"], r["answer"]) for r in chunk]
        width = max(len(ids) for ids, _ in pairs) - 1
        x = torch.tensor([ids[:-1] + [tok.pad_id] * (width - len(ids) + 1) for ids, _ in pairs])
        y = torch.tensor([lab[1:] + [IGNORE_INDEX] * (width - len(lab) + 1) for _, lab in pairs])
        logits = model(x.to(model.wte.weight.device)).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1).to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


def respond(model: GPT, tok: ChatTokenizer, prompts: list[list[int]], batch_size: int, sampling: SamplingConfig,
            generator: torch.Generator | None = None, label: str = "generating") -> list[list[int]]:
    out: list[list[int]] = []
    for chunk in track(batches(prompts, batch_size), description=label, transient=True):
        out += generate(model, chunk, sampling, stop_id=tok.end_id, pad_id=tok.pad_id, generator=generator)
    return out


def exact_match(tok: ChatTokenizer, rows: list[dict], responses: list[list[int]],
                grade: Callable[[str, str], bool] = check) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, resp in zip(rows, responses):
        hits[row["family"]].append(grade(row["answer"], tok.decode(tok.strip_response(resp))))
    every = [h for fam in hits.values() for h in fam]
    out = {"exact_match": sum(every) / max(len(every), 1)}
    out.update({f"exact_match/{fam}": sum(h) / len(h) for fam, h in sorted(hits.items())})
    return out


def check_final(answer: str, response: str) -> bool:
    """Chain-of-thought grading: the answer after the reply's last `Answer:` must match."""
    return check(answer, final_answer(response))


@dataclass
class PromptSet:
    """One split's problems asked three ways (the same prompts for every checkpoint)."""

    rows: list[dict]
    zero_shot: list[list[int]]
    few_shot: list[list[int]]
    cot: list[list[int]]
    shots: float  # mean exemplars that fit in the context

    @classmethod
    def build(cls, tok: ChatTokenizer, templates: PromptTemplates, pool: FewShotPool, rows: list[dict],
              room: int) -> PromptSet:
        """`room`: the most prompt tokens that still leave the direct answer budget in the context."""
        few = [few_shot_prompt(tok, templates, pool.exemplars(r, templates.shots), r["prompt"], room) for r in rows]
        return cls(rows, [tok.prompt(templates.question(r["prompt"])) for r in rows], [ids for ids, _ in few],
                   [tok.prompt(templates.worked(r["prompt"])) for r in rows], mean([float(n) for _, n in few]))


@torch.no_grad()
def reward_scores(rm: ScalarHead, tok: ChatTokenizer, prompts: list[list[int]], responses: list[list[int]],
                  batch_size: int) -> list[float]:
    scores: list[float] = []
    device = rm.head.weight.device
    for i in range(0, len(prompts), batch_size):
        resps = responses[i:i + batch_size]
        seq, attn, mask, P = build_sequences(prompts[i:i + batch_size], resps, tok.pad_id, device)
        scores += rm(seq, P + mask.sum(1).clamp(min=1) - 1, attn, response_mask=response_positions(mask, P)).tolist()
    return scores


@torch.no_grad()
def kl_to_reference(model: GPT, reference: GPT, tok: ChatTokenizer, prompts: list[list[int]],
                    responses: list[list[int]], batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        seq, attn, mask, P = build_sequences(prompts[i:i + batch_size], responses[i:i + batch_size], tok.pad_id,
                                             model.wte.weight.device)
        logp = F.log_softmax(model(seq, attention_mask=attn)[:, P - 1:-1].float(), -1)
        ref_logp = F.log_softmax(reference(seq, attention_mask=attn)[:, P - 1:-1].float(), -1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)
        total += float((kl * mask).sum())
    return total / max(len(prompts), 1)


def prompting_rows(model: GPT, tok: ChatTokenizer, split: PromptSet, suffix: str, cfg: EvaluateConfig,
                   zero_shot: list[list[int]] | None = None) -> dict[str, float]:
    """Exact match zero-shot, few-shot and chain-of-thought on one split; keys end with `suffix`.
    `zero_shot`: the greedy zero-shot responses when they are already at hand."""
    if not split.rows:
        return {f"exact_match{m}{suffix}": float("nan") for m in ("", "_fewshot", "_cot")}
    direct = SamplingConfig(cfg.max_new_tokens, 0.0)
    worked = SamplingConfig(cfg.cot_max_new_tokens, 0.0)
    bs = cfg.batch_size
    if zero_shot is None:
        zero_shot = respond(model, tok, split.zero_shot, bs, direct)
    return {
        f"exact_match{suffix}": exact_match(tok, split.rows, zero_shot)["exact_match"],
        f"exact_match_fewshot{suffix}": exact_match(
            tok, split.rows, respond(model, tok, split.few_shot, bs, direct, label="few-shot"))["exact_match"],
        f"exact_match_cot{suffix}": exact_match(
            tok, split.rows, respond(model, tok, split.cot, bs, worked, label="chain of thought"),
            check_final)["exact_match"],
    }


def evaluate_checkpoint(model: GPT, tok: ChatTokenizer, prompts: PromptSet, hard: PromptSet,
                        reward_model: ScalarHead, sft: GPT, cfg: EvaluateConfig, seed: int) -> dict[str, float]:
    bs, new = cfg.batch_size, cfg.max_new_tokens
    rows = prompts.rows
    loss = answer_loss(model, tok, rows, bs)
    responses = respond(model, tok, prompts.zero_shot, bs, SamplingConfig(new, 0.0))
    sample_rows, sample_prompts = rows[:cfg.samples], prompts.zero_shot[:cfg.samples]
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    samples = respond(model, tok, sample_prompts, bs, SamplingConfig(new, 1.0), g, "sampling")
    out = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), **exact_match(tok, rows, responses),
           **prompting_rows(model, tok, prompts, "", cfg, zero_shot=responses),
           **prompting_rows(model, tok, hard, "_hard", cfg),
           "fewshot_shots": prompts.shots,
           "exact_match_sampled": exact_match(tok, sample_rows, samples)["exact_match"],
           "reward": mean(reward_scores(reward_model, tok, sample_prompts, samples, bs)),
           "reward_greedy": mean(reward_scores(reward_model, tok, prompts.zero_shot, responses, bs)),
           "kl_to_sft": kl_to_reference(model, sft, tok, sample_prompts, samples, bs),
           "response_length": sum(len(tok.strip_response(r)) for r in responses) / max(len(responses), 1),
           "eos_rate": sum(tok.end_id in r for r in responses) / max(len(responses), 1)}
    return {k: round(float(v), 6) for k, v in out.items()}
