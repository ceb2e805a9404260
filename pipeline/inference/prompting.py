"""Prompts for a chat-trained GPT: templates from config, few-shot and chain-of-thought prompting.

Three ways to ask the same problem, each a measured row of `evaluate`:
- zero-shot: the question alone, through the `zero_shot` template, in one user turn;
- few-shot (k-shot): k solved problems of the same task family, drawn from the SFT split (training
  data, never eval: every eval-partition key is refused), as earlier turns of the conversation;
- chain of thought: the question through the `cot` template, which appends the trigger phrase the
  SFT data used for its worked solutions (`data.cot.trigger`); the reply's final answer is the text
  after its last `Answer:` (`pipeline.data.tasks.final_answer`).

Templates are plain `str.format` strings: `{question}` is the problem's text and `{trigger}` the
chain-of-thought phrase.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.data.tokenizer import ChatTokenizer

MODES = ("zero_shot", "few_shot", "cot")


@dataclass(frozen=True)
class PromptTemplates:
    """How evaluate (and anyone else) phrases a problem: `evaluate.prompts` (checked by
    pipeline.config.evaluate.PromptsConfig) plus the chain-of-thought trigger the SFT data used."""

    zero_shot: str = "{question}"
    cot: str = "{question} {trigger}"
    shots: int = 3
    trigger: str = "Think step by step."

    @classmethod
    def from_config(cls, prompts: Any, trigger: str) -> PromptTemplates:
        return cls(zero_shot=prompts.zero_shot, cot=prompts.cot, shots=prompts.shots, trigger=trigger)

    def question(self, text: str) -> str:
        return self.zero_shot.format(question=text, trigger=self.trigger)

    def worked(self, text: str) -> str:
        return self.cot.format(question=text, trigger=self.trigger)


class FewShotPool:
    """Solved training problems to show before a question: direct, correct SFT demonstrations.

    Worked (chain-of-thought) rows and rows whose demonstration carries a deliberate error are left
    out, and the correct `answer` is shown. A row whose key is in `held_out` (the eval keys) is an
    error, not a silent skip: exemplars must never reveal an eval problem.
    """

    def __init__(self, rows: Iterable[dict], held_out: set[str], seed: int) -> None:
        self.by_family: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row["key"] in held_out:
                raise ValueError(f"few-shot pool row {row['key']!r} is an eval problem: exemplars must come "
                                 "from training data only")
            if row.get("cot") or row.get("demo_error"):
                continue
            self.by_family[row["family"]].append({"prompt": row["messages"][-2]["content"], "answer": row["answer"],
                                                  "key": row["key"], "family": row["family"]})
        self.seed = seed

    def exemplars(self, row: dict, k: int) -> list[dict]:
        """k solved problems for `row`, of its family when there are enough, never its own key;
        the same row always gets the same exemplars."""
        rng = random.Random(f"{self.seed}:{row['key']}")
        same = [e for e in self.by_family.get(row["family"], []) if e["key"] != row["key"]]
        if len(same) >= k:
            return rng.sample(same, k)
        others = [e for fam, rows in sorted(self.by_family.items()) if fam != row["family"] for e in rows]
        return same + rng.sample(others, min(k - len(same), len(others)))


def few_shot_prompt(tok: ChatTokenizer, templates: PromptTemplates, exemplars: list[dict], question: str,
                    room: int) -> tuple[list[int], int]:
    """(prompt ids, shots used): the exemplars as earlier turns, then the question, in the tokenizer's chat
    template. The exemplars farthest from the question are dropped until the prompt fits in `room` tokens."""
    ask = {"role": "user", "content": templates.question(question)}
    shots = [[{"role": "user", "content": templates.question(e["prompt"])},
              {"role": "assistant", "content": e["answer"]}] for e in exemplars]
    while True:
        ids = tok.render([*(m for shot in shots for m in shot), ask], add_generation_prompt=True)
        if len(ids) <= room or not shots:
            return ids, len(shots)
        shots.pop(0)
