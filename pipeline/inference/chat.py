"""A conversation with one model in the chat template: history, streamed replies, /commands to tune sampling.

The conversation is rendered in the tokenizer's chat template (`render`: the pipeline's <|bos|> <|user|> q1
<|assistant|> a1 <|end|> <|user|> q2 <|assistant|> ..., or an adopted checkpoint's own), each reply as the
exact tokens sampled where the template is token-level, and the oldest turns are dropped when it would no
longer fit the model's context.

Replies stream token by token as they are sampled, on the model's device (the CLI places it on
`trainer.accelerator` in `trainer.precision`: pipeline.inference.placement). `gpt-pipeline chat` and
`generate` drive it.

The context (`model.block_size`) holds the prompt and the reply together, and `max_new_tokens` of it are kept
for the reply. What cannot fit is refused (ValueError, naming the numbers), never cut: a `max_new_tokens` of
the whole context or more, when the chat starts (no prompt could leave that room: it is a mistake, and
clamping it would give each turn a different, unannounced limit); a prompt longer than the room left once
every earlier turn is dropped (the system message and the question alone), when it is asked (cutting it
would drop its chat header, `<|bos|><|user|>`, and the start of the question, unseen). A refused question is
not remembered; the conversation goes on.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import replace

import torch

from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.placement import Placement
from pipeline.inference.sampling import SamplingConfig, generate
from pipeline.model.gpt import GPT

# /command -> (SamplingConfig field, type, how the confirmation names it)
SETTINGS = {"temp": ("temperature", float, "temperature"), "topk": ("top_k", int, "top-k"),
            "topp": ("top_p", float, "top-p"), "rep": ("repetition_penalty", float, "repetition penalty")}
HELP = "commands: /reset (forget the conversation), /temp T, /topk K, /topp P, /rep R (repetition penalty), /quit"


class Chat:
    """A conversation with one model: history in the chat template, streamed replies."""

    def __init__(self, model: GPT, tok: ChatTokenizer, sampling: SamplingConfig, seed: int,
                 placement: Placement | None = None, system: str | None = None) -> None:
        """`placement`: where `model` was put (its autocast wraps every reply). The sampler's generator is made
        on the model's device at the first reply. `system`: a system message that opens every prompt (the
        template folds it into the first user turn: `pipeline.data.tokenizer.fold_system`), kept when old turns
        are dropped."""
        block = model.config.block_size
        if sampling.max_new_tokens >= block:
            raise ValueError(f"max_new_tokens {sampling.max_new_tokens} leaves no room for a prompt: the model's "
                             f"context (model.block_size) holds {block} tokens, prompt and reply together; ask for "
                             f"fewer than {block} (e.g. --max-new-tokens {block // 2})")
        self.model, self.tok, self.sampling, self.seed = model, tok, sampling, seed
        self.system = [{"role": "system", "content": system}] if system else []
        self.autocast = placement.autocast if placement is not None else nullcontext
        self.generator: torch.Generator | None = None
        self.turns: list[tuple[list[int], list[int]]] = []  # (user ids, reply ids incl. end)

    def context(self, question: str) -> list[int]:
        """The prompt for the next reply; the oldest turns are dropped until it leaves room to answer. A prompt
        that leaves no room even alone is refused (ValueError), not cut."""
        block, reply = self.model.config.block_size, self.sampling.max_new_tokens
        room = block - reply
        ask = {"role": "user", "content": question}
        turns = list(self.turns)
        while True:
            ids = self.tok.render([*self.system, *self.history(turns), ask], add_generation_prompt=True)
            if len(ids) <= room:
                return ids
            if not turns:
                what = "the system message and the question are" if self.system else "the question is"
                raise ValueError(f"{what} {len(ids)} tokens in the chat template, more than the {room} the model's "
                                 f"context leaves for a prompt ({block} tokens, model.block_size, less "
                                 f"max_new_tokens {reply} for the reply): shorten it, or lower --max-new-tokens")
            turns.pop(0)

    def history(self, turns: list[tuple[list[int], list[int]]]) -> list[dict]:
        """The turns as messages; each carries its exact ids, which a token-level template uses as they are."""
        out = []
        for user, reply in turns:
            reply = self.tok.strip_response(reply)
            out += [{"role": "user", "content": self.tok.decode(user), "ids": user},
                    {"role": "assistant", "content": self.tok.decode(reply), "ids": reply}]
        return out

    def reply(self, question: str, out=None) -> str:
        """Sample a reply to `question`, writing it to `out` (default: the current stdout) as it is sampled;
        remember the exchange."""
        out = out or sys.stdout  # looked up per call: a default bound at import would miss redirection
        ids: list[int] = []
        shown = ""

        def stream(step: list[int]) -> None:
            nonlocal shown
            ids.append(step[0])
            text = self.tok.decode(self.tok.strip_response(ids))
            if text.startswith(shown):  # a byte-level BPE piece can complete a character later
                out.write(text[len(shown):])
                out.flush()
                shown = text

        if self.generator is None:
            self.generator = torch.Generator(device=self.model.wte.weight.device).manual_seed(self.seed)
        with self.autocast():
            response = generate(self.model, [self.context(question)], self.sampling, stop_id=self.tok.end_id,
                                pad_id=self.tok.pad_id, generator=self.generator, on_step=stream)[0]
        text = self.tok.decode(self.tok.strip_response(response))
        out.write(text[len(shown):] + "\n")
        out.flush()
        reply = response if self.tok.end_id in response else response + [self.tok.end_id]
        self.turns.append((self.tok.encode(question), reply))
        return text

    def command(self, line: str) -> str | None:
        """Apply a /command; return a message for the user, or None to quit."""
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit"):
            return None
        if name == "reset":
            self.turns.clear()
            return "(conversation cleared)"
        if name not in SETTINGS:
            return f"(unknown command /{name}; {HELP})"
        field, kind, label = SETTINGS[name]
        try:  # replace() re-validates, so /topp 0 or /temp -1 is refused rather than breaking sampling
            self.sampling = replace(self.sampling, **{field: kind(arg)})
        except ValueError:
            return f"(bad value {arg!r} for /{name})"
        return f"({label} {getattr(self.sampling, field)})"
