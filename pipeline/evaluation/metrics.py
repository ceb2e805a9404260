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

The problems are scored in chunks of `evaluate.batch_size` (one batch each), chunk i by rank
i % world (pipeline.inference.placement), and every chunk's per-problem answers and scores are gathered
back into problem order before any mean is taken, so the table does not depend on the number of
processes. The sampled replies of chunk i draw from a generator seeded `chunk_seed(seed, i)`: what a
chunk samples depends neither on the rank that samples it nor on the chunks before it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config.evaluate import EvaluateConfig
from pipeline.data.tasks import check, final_answer
from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer
from pipeline.inference.placement import Ranks
from pipeline.inference.prompting import FewShotPool, PromptTemplates, few_shot_prompt
from pipeline.inference.sampling import SamplingConfig, chunk_seed, generate
from pipeline.inference.sequences import build_sequences, response_positions
from pipeline.logs import progress
from pipeline.model.gpt import GPT
from pipeline.model.heads import ScalarHead


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


@torch.no_grad()
def answer_loss(model: GPT, tok: ChatTokenizer, rows: list[dict]) -> tuple[float, int]:
    """The summed next-token loss of the rows' answers (+ end token), one batch, and the tokens it sums over."""
    pairs = [tok.conversation(r["prompt"], r["answer"]) for r in rows]
    width = max(len(ids) for ids, _ in pairs) - 1
    x = torch.tensor([ids[:-1] + [tok.pad_id] * (width - len(ids) + 1) for ids, _ in pairs])
    y = torch.tensor([lab[1:] + [IGNORE_INDEX] * (width - len(lab) + 1) for _, lab in pairs])
    logits = model(x.to(model.wte.weight.device)).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((y != IGNORE_INDEX).sum())


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
def reward_scores(rm: ScalarHead, tok: ChatTokenizer, prompts: list[list[int]],
                  responses: list[list[int]]) -> list[float]:
    """The reward model's score of each (prompt, response), one batch."""
    seq, attn, mask, P = build_sequences(prompts, responses, tok.pad_id, rm.head.weight.device)
    last = P + mask.sum(1).clamp(min=1) - 1
    return rm(seq, last, attn, response_mask=response_positions(mask, P)).float().tolist()


@torch.no_grad()
def kl_to_reference(model: GPT, reference: GPT, tok: ChatTokenizer, prompts: list[list[int]],
                    responses: list[list[int]]) -> list[float]:
    """KL(model || reference) of each response: exact over the vocabulary at every position, summed; one batch."""
    seq, attn, mask, P = build_sequences(prompts, responses, tok.pad_id, model.wte.weight.device)
    logp = F.log_softmax(model(seq, attention_mask=attn)[:, P - 1:-1].float(), -1)
    ref_logp = F.log_softmax(reference(seq, attention_mask=attn)[:, P - 1:-1].float(), -1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (kl * mask).sum(1).tolist()


@dataclass
class ChunkScores:
    """One chunk of a split's problems as one rank scored it: per-problem replies and scores, in problem order."""

    zero_shot: list[list[int]]      # greedy replies to each way of asking
    few_shot: list[list[int]]
    cot: list[list[int]]
    loss: float = 0.0               # the eval split only: summed answer loss and the tokens it sums over,
    tokens: int = 0
    reward_greedy: list[float] = field(default_factory=list)   # the greedy zero-shot replies' reward,
    samples: list[list[int]] = field(default_factory=list)     # and of the problems among the first
    reward: list[float] = field(default_factory=list)          # `evaluate.samples`: a sampled reply,
    kl: list[float] = field(default_factory=list)              # its reward and its KL to SFT


@dataclass
class Judges:
    """What scores the eval split beyond exact match: the reward model and the SFT reference (for KL)."""

    reward_model: ScalarHead
    reference: GPT


def score_chunk(model: GPT, tok: ChatTokenizer, split: PromptSet, chunk: int, cfg: EvaluateConfig,
                judges: Judges | None, seed: int, zero_shot_only: bool = False) -> ChunkScores:
    """Problems [chunk * batch_size, (chunk + 1) * batch_size) of `split`: greedy replies asked three ways (only
    zero-shot with `zero_shot_only`: align's monitor); with `judges`, also the answer loss, the reward of the greedy
    replies and, for problems among the first `cfg.samples`, a sampled reply with its reward and KL to the
    reference."""
    lo, hi = chunk * cfg.batch_size, (chunk + 1) * cfg.batch_size
    direct, worked = SamplingConfig(cfg.max_new_tokens, 0.0), SamplingConfig(cfg.cot_max_new_tokens, 0.0)

    def ask(prompts: list[list[int]], sampling: SamplingConfig, generator: torch.Generator | None = None):
        return generate(model, prompts, sampling, stop_id=tok.end_id, pad_id=tok.pad_id, generator=generator)

    zero_shot = split.zero_shot[lo:hi]
    if zero_shot_only:
        out = ChunkScores(ask(zero_shot, direct), [], [])
    else:
        out = ChunkScores(ask(zero_shot, direct), ask(split.few_shot[lo:hi], direct), ask(split.cot[lo:hi], worked))
    if judges is None:
        return out
    out.loss, out.tokens = answer_loss(model, tok, split.rows[lo:hi])
    out.reward_greedy = reward_scores(judges.reward_model, tok, zero_shot, out.zero_shot)
    sampled = split.zero_shot[lo:min(hi, cfg.samples)]
    if sampled:
        g = torch.Generator(device=model.wte.weight.device).manual_seed(chunk_seed(seed, chunk))
        out.samples = ask(sampled, SamplingConfig(cfg.max_new_tokens, 1.0), g)
        out.reward = reward_scores(judges.reward_model, tok, sampled, out.samples)
        out.kl = kl_to_reference(model, judges.reference, tok, sampled, out.samples)
    return out


def joined(chunks: list[ChunkScores], name: str) -> list:
    return [x for c in chunks for x in getattr(c, name)]


def held_out(tok: ChatTokenizer, rows: list[dict], chunks: list[ChunkScores]) -> dict[str, float]:
    """What the judged chunks of the eval split give: greedy exact match, the sampled replies' exact match, reward
    and KL to the reference, the greedy replies' reward, length and end rate (evaluate's row and align's monitor)."""
    responses, samples = joined(chunks, "zero_shot"), joined(chunks, "samples")
    return {"exact_match": exact_match(tok, rows, responses)["exact_match"],
            "exact_match_sampled": exact_match(tok, rows[:len(samples)], samples)["exact_match"],
            "reward": mean(joined(chunks, "reward")),
            "reward_greedy": mean(joined(chunks, "reward_greedy")),
            "kl_to_sft": mean(joined(chunks, "kl")),
            "response_length": sum(len(tok.strip_response(r)) for r in responses) / max(len(responses), 1),
            "eos_rate": sum(tok.end_id in r for r in responses) / max(len(responses), 1)}


def reward_hacking(now: dict[str, float], start: dict[str, float]) -> bool:
    """The reward model's score rose from `start` to `now` while checked accuracy (greedy or sampled) fell: the
    verdict's test of the aligned model against SFT, and align's monitor's of each evaluation against the first."""
    fell = now["exact_match"] < start["exact_match"] or now["exact_match_sampled"] < start["exact_match_sampled"]
    return now["reward"] > start["reward"] and fell


def prompting_rows(tok: ChatTokenizer, split: PromptSet, chunks: list[ChunkScores], suffix: str) -> dict[str, float]:
    """Exact match zero-shot, few-shot and chain-of-thought on one split; keys end with `suffix`."""
    if not split.rows:
        return {f"exact_match{m}{suffix}": float("nan") for m in ("", "_fewshot", "_cot")}
    return {
        f"exact_match{suffix}": exact_match(tok, split.rows, joined(chunks, "zero_shot"))["exact_match"],
        f"exact_match_fewshot{suffix}": exact_match(tok, split.rows, joined(chunks, "few_shot"))["exact_match"],
        f"exact_match_cot{suffix}": exact_match(tok, split.rows, joined(chunks, "cot"), check_final)["exact_match"],
    }


def evaluate_checkpoint(model: GPT, tok: ChatTokenizer, prompts: PromptSet, hard: PromptSet,
                        reward_model: ScalarHead, sft: GPT, cfg: EvaluateConfig, seed: int,
                        ranks: Ranks = Ranks(), name: str = "checkpoint") -> dict[str, float]:
    """Every metric of `model` (module docstring); this rank scores its share of the chunks, and every rank
    returns the metrics of all of them. `name` labels the progress bar."""
    n_eval = math.ceil(len(prompts.rows) / cfg.batch_size)
    work = ([(prompts, c, Judges(reward_model, sft)) for c in range(n_eval)]
            + [(hard, c, None) for c in range(math.ceil(len(hard.rows) / cfg.batch_size))])
    mine = {i: score_chunk(model, tok, work[i][0], work[i][1], cfg, work[i][2], seed)
            for i in progress(ranks.mine(len(work)), f"evaluating {name}")}
    gathered = {i: scores for share in ranks.gather(mine) for i, scores in share.items()}
    chunks = [gathered[i] for i in range(len(work))]
    ev, hd = chunks[:n_eval], chunks[n_eval:]
    loss = sum(c.loss for c in ev) / max(sum(c.tokens for c in ev), 1)
    judged = held_out(tok, prompts.rows, ev)
    judged.pop("exact_match")  # the first key of exact_match's families, where the table has always had it
    out = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
           **exact_match(tok, prompts.rows, joined(ev, "zero_shot")),
           **prompting_rows(tok, prompts, ev, ""), **prompting_rows(tok, hard, hd, "_hard"),
           "fewshot_shots": prompts.shots, **judged}
    return {k: round(float(v), 6) for k, v in out.items()}
