"""The server's generation loop: requests that arrive together decode together, through the KV cache.

One thread owns the models and the device. Handlers submit `Job`s (one per choice of a request: its prompt ids,
sampling settings, stop strings and a callback); the thread takes every job waiting, after a short window that
lets clients arriving together meet, and decodes them as one left-padded batch, one token per row per step
(`pipeline.inference.sampling`'s padding and filtering; per-row temperature, top-p and generator, which the
stages' sampler, one setting per batch, has no need for). A wave runs until its last row stops; jobs that arrive
meanwhile wait for the next one (static batching: a row can't join a left-padded cache mid-wave). A wave never
needs more positions than the model's context: a job that would push it past `block_size` waits for the next.

Each row reports its new text as it is decoded: text a stop string could still begin, or an incomplete UTF-8
character, is held back until it is settled. A cancelled job (its client went away) stops at the next step and
frees its row. An exception in a wave fails that wave's jobs with the error and the thread serves on.

Written here rather than taken from a serving library: vLLM and TGI need CUDA and their own model code; the
pipeline's `GPT` (any architecture it loads) is what must be served, with its own KV cache.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.sampling import filter_logits, left_pad
from pipeline.model.gpt import GPT

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence ends with


@dataclass
class Job:
    """One completion to decode: `emit(kind, payload)` receives ("delta", text) pieces, then ("done",
    (finish_reason, completion_tokens)) or ("error", message)."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: tuple[str, ...]
    seed: int  # of the row's sampling generator (made on the model's device)
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Row:
    """A job's progress in a wave: its tokens, the text already emitted, and why it stopped."""

    def __init__(self, job: Job) -> None:
        self.job, self.ids, self.shown, self.finish = job, [], "", None
        self.generator: torch.Generator | None = None

    def settled(self, text: str) -> str:
        """The part of `text` that no stop string can still claim, nor a later byte complete."""
        hold = max((k for s in self.job.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        return text.rstrip(REPLACEMENT)

    def advance(self, token: int, tok: ChatTokenizer, stop_ids: set[int]) -> None:
        """Take the next token; emit what it settles; note when the row is finished."""
        self.ids.append(token)
        text = tok.decode(tok.strip_response(self.ids))
        cut = min((i for i in (text.find(s) for s in self.job.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        elif token in stop_ids:
            self.finish = "stop"
        elif len(self.ids) >= self.job.max_tokens:
            self.finish = "length"
        out = text if self.finish else self.settled(text)
        if out.startswith(self.shown) and len(out) > len(self.shown):
            self.job.emit("delta", out[len(self.shown):])
            self.shown = out
        if self.finish:
            self.job.emit("done", (self.finish, len(self.ids)))


class Engine:
    """The generation thread: `submit` jobs from any thread; `start` and `stop` it."""

    def __init__(self, load: Callable[[str], GPT], tok: ChatTokenizer, *, max_batch: int = 16,
                 window_s: float = 0.01, autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """`load(name)` returns model `name`, placed on its device (called on the thread, once per model)."""
        self.load, self.tok, self.max_batch, self.window_s, self.autocast = load, tok, max_batch, window_s, autocast
        self.models: dict[str, GPT] = {}
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue but left for a later wave
        self.thread = threading.Thread(target=self.serve, name="generation", daemon=True)
        self.stop_ids = {tok.end_id}
        self.waves = 0  # waves decoded so far, the most rows one held, jobs cancelled: what /health reports
        self.widest = 0
        self.cancelled = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.jobs.put(job)

    def model(self, name: str) -> GPT:
        if name not in self.models:
            self.models[name] = self.load(name)
        return self.models[name]

    def pending(self) -> int:
        return self.jobs.qsize() + len(self.waiting)

    # ------------------------------------------------------------------ the thread

    def serve(self) -> None:
        while True:
            if not self.waiting:
                first = self.jobs.get()
                if first is None:
                    return
                self.waiting.append(first)
                time.sleep(self.window_s)  # let the requests that arrive together meet
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self.waiting.append(job)
            wave = self.take_wave()
            if wave:
                self.run_wave(wave)

    def take_wave(self) -> list[Job]:
        """The oldest waiting job's model's jobs, oldest first, as many as fit one batch in the context."""
        gone = [j for j in self.waiting if j.cancelled.is_set()]  # their clients left before they started
        self.cancelled += len(gone)
        self.waiting = [j for j in self.waiting if not j.cancelled.is_set()]
        if not self.waiting:
            return []
        name = self.waiting[0].model
        try:
            block = self.model(name).config.block_size
        except Exception as err:  # a checkpoint that fails to load fails its jobs, not the server
            failed = [j for j in self.waiting if j.model == name]
            self.waiting = [j for j in self.waiting if j.model != name]
            for job in failed:
                job.emit("error", f"checkpoint {name!r} failed to load: {err}")
            return []
        wave, later, width, budget = [], [], 0, 0
        for job in self.waiting:
            w, b = max(width, len(job.prompt)), max(budget, job.max_tokens)
            if job.model == name and len(wave) < self.max_batch and w + b <= block:
                wave.append(job)
                width, budget = w, b
            else:
                later.append(job)
        self.waiting = later
        return wave

    def run_wave(self, jobs: list[Job]) -> None:
        rows = [Row(j) for j in jobs]
        try:
            with self.autocast():
                self.decode(self.model(jobs[0].model), rows)
        except Exception as err:
            log.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                if row.finish is None:
                    row.job.emit("error", f"generation failed: {type(err).__name__}: {err}")
        self.waves += 1
        self.widest = max(self.widest, len(rows))

    @torch.no_grad()
    def decode(self, model: GPT, rows: list[Row]) -> None:
        device = model.wte.weight.device
        ids, mask = left_pad([r.job.prompt for r in rows], self.tok.pad_id, device)
        B, budget = len(rows), max(r.job.max_tokens for r in rows)
        cache = model.new_kv_cache(B, ids.size(1) + budget)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for row in rows:
            if row.job.temperature > 0:
                row.generator = torch.Generator(device=device).manual_seed(row.job.seed)
        step_ids, step_mask = ids, mask
        for _ in range(budget):
            logits = model(step_ids, attention_mask=step_mask, kv_cache=cache)[:, -1].float()
            nxt = logits.argmax(-1)
            for i, row in enumerate(rows):
                job = row.job
                if row.finish is None and job.temperature > 0:
                    scaled = filter_logits(logits[i:i + 1] / job.temperature, 0, job.top_p)
                    nxt[i] = torch.multinomial(torch.softmax(scaled, -1), 1, generator=row.generator)[0, 0]
            tokens = nxt.tolist()
            for i, row in enumerate(rows):
                if row.finish is None and row.job.cancelled.is_set():
                    row.finish = "cancelled"  # its row decodes padding until the wave ends
                    self.cancelled += 1
                if row.finish is None:
                    row.advance(tokens[i], self.tok, self.stop_ids)
            done = torch.tensor([r.finish is not None for r in rows], device=device)
            if done.all():
                return
            nxt = torch.where(done, torch.full_like(nxt, self.tok.pad_id), nxt)
            step_ids, step_mask = nxt[:, None], ~done[:, None]
