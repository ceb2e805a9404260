"""The server's generation loop: concurrent requests decode together, through the KV cache.

One thread owns the models and the device. Handlers submit `Job`s (one per choice of a request: its prompt ids,
sampling settings, stop strings and a callback). The thread decodes the oldest waiting job's model in a wave: one
left-padded batch, one token per row per step, each row with its own temperature, top-p and generator (the
stages' sampler, `pipeline.inference.sampling`, has one setting per batch and no need for more). Between steps
rows join and leave (continuous batching): a finished or cancelled row is dropped from the batch and its cache,
and a waiting job of the same model joins by prefilling its prompt, left-padded to the cache's current length,
through a cache of its own that is appended to the wave's. A job whose prompt is longer than that length waits a
few steps (the cache grows by one position a step); one whose tokens would not fit in the rest of the context
waits for the next wave, which starts once this one drains.
An optional window (`window_s`) lets an idle server wait for more requests before its first step.

Each row reports its new text as it is decoded: text a stop string could still begin, or an incomplete UTF-8
character, is held back until it is settled. A cancelled job (its client went away) leaves at the next step. An
exception in a wave fails that wave's jobs with the error and the thread serves on.

Written here rather than taken from a serving library: vLLM and TGI need CUDA and their own model code; the
pipeline's `GPT` (any architecture it loads) is what must be served, with its own KV cache (`KVCache`, whose
tensors a join concatenates and a departure indexes: one integer length for all rows, as the cache is made).
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
import torch.nn.functional as F

from pipeline.data.tokenizer import ChatTokenizer
from pipeline.inference.sampling import filter_logits, left_pad
from pipeline.model.gpt import GPT
from pipeline.model.kv_cache import KVCache

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence ends with
TINY = torch.finfo(torch.float32).tiny  # the smallest temperature and top_p sampled with (logits are float32)


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


def pad_left(prompts: list[list[int]], width: int, pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`left_pad`'s (ids, attention_mask), widened on the left to `width` columns (a joining job meets the wave's
    cache length, which can exceed its longest prompt)."""
    ids, mask = left_pad(prompts, pad_id, device)
    extra = width - ids.size(1)
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=False)


class Engine:
    """The generation thread: `submit` jobs from any thread; `start` and `stop` it."""

    def __init__(self, load: Callable[[str], GPT], tok: ChatTokenizer, *, max_batch: int = 16,
                 window_s: float = 0.0, autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
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
        self.stopping = False

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
        while not self.stopping:
            if not self.waiting:
                first = self.jobs.get()
                if first is None:
                    return
                self.waiting.append(first)
                if self.window_s:
                    time.sleep(self.window_s)
            try:
                self.collect()
                name = self.oldest()
                if name is not None:
                    self.run_wave(name)
            except Exception:  # a bug here must not stop the thread, which every request waits on
                log.exception("the generation thread's loop failed; serving on")

    def collect(self) -> None:
        """Move what the queue holds into `waiting` (without blocking); note a stop."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
                return
            self.waiting.append(job)

    def oldest(self) -> str | None:
        """The model of the oldest waiting job, loaded; drops cancelled jobs, fails the jobs of a model that can't
        load."""
        gone = [j for j in self.waiting if j.cancelled.is_set()]  # their clients left before they started
        self.cancelled += len(gone)
        self.waiting = [j for j in self.waiting if not j.cancelled.is_set()]
        if not self.waiting:
            return None
        name = self.waiting[0].model
        try:
            self.model(name)
        except Exception as err:  # a checkpoint that fails to load fails its jobs, not the server
            failed = [j for j in self.waiting if j.model == name]
            self.waiting = [j for j in self.waiting if j.model != name]
            for job in failed:
                job.emit("error", f"checkpoint {name!r} failed to load: {err}")
            return None
        return name

    def joining(self, name: str, length: int | None, rows: int, span: int) -> list[Job]:
        """The waiting jobs of model `name` that can join a wave whose cache holds `length` positions (None: a new
        wave) and `rows` rows, oldest first: as many as `max_batch` allows, each with a prompt no longer than
        `length` and room for its tokens in the cache's `span`."""
        self.collect()
        take, later = [], []
        width, budget = length or 0, 0  # a new wave's width is its longest prompt
        for job in self.waiting:
            fits = job.model == name and rows + len(take) < self.max_batch and not job.cancelled.is_set()
            w, b = (length, job.max_tokens) if length is not None else (max(width, len(job.prompt)),
                                                                        max(budget, job.max_tokens))
            if fits and len(job.prompt) <= w and w + b <= span:
                take.append(job)
                width, budget = w, b
            else:
                later.append(job)
        self.waiting = later
        return take

    def run_wave(self, name: str) -> None:
        admitted: list[Row] = []  # every row the wave took: an error fails those not yet finished
        try:
            with self.autocast():
                self.decode(self.model(name), name, admitted)
        except Exception as err:
            live = [row for row in admitted if row.finish is None]
            log.exception("generation failed for a batch of %d", len(live))
            for row in live:
                row.finish = "error"
                row.job.emit("error", f"generation failed: {type(err).__name__}: {err}")
        self.waves += 1

    def pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: greedy, or sampled with its temperature, top-p and generator."""
        nxt = logits.argmax(-1)
        for i, row in enumerate(rows):
            job = row.job
            if job.temperature > 0:
                # shifted so the best logit is 0: a tiny temperature then sends the others to -inf, where dividing
                # the raw logits would give inf - inf = nan; a temperature or top_p below float32's range would be
                # 0 there (a division by 0; every token dropped), so they are at least its smallest normal number
                shifted = logits[i:i + 1] - logits[i:i + 1].max()
                scaled = filter_logits(shifted / max(job.temperature, TINY), 0, max(job.top_p, TINY))
                nxt[i] = torch.multinomial(torch.softmax(scaled, -1), 1, generator=row.generator)[0, 0]
        return nxt.tolist()

    def advance(self, rows: list[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if row.job.cancelled.is_set():
                row.finish = "cancelled"  # its client left: its row is dropped below
                self.cancelled += 1
            else:
                row.advance(token, self.tok, self.stop_ids)

    @torch.no_grad()
    def decode(self, model: GPT, name: str, admitted: list[Row]) -> None:
        """Decode a wave of model `name` until its last row stops; `admitted` receives every row it takes.

        Each step feeds every live row its last token through the shared cache. Between steps, finished rows
        leave the batch (their cache rows dropped) and waiting jobs join: each prompt, left-padded to the
        cache's length, is prefilled through a cache of its own, which is then appended to the wave's. The cache
        spans the model's context (the model refuses a longer one), so a job joins only while the cache's length
        plus its `max_tokens` fit in it: one asking for the whole rest of the context (no `max_tokens`) joins
        only a wave no longer than its prompt, else waits for the next."""
        device = model.wte.weight.device
        span = model.config.block_size
        cache: KVCache | None = None
        rows: list[Row] = []  # the live rows, in the cache's row order
        feed = torch.empty(0, dtype=torch.long, device=device)  # each live row's last token, fed next step
        while True:
            if rows:
                logits = model(feed[:, None], attention_mask=torch.ones_like(feed, dtype=torch.bool)[:, None],
                               kv_cache=cache)[:, -1].float()
                tokens = self.pick(rows, logits)
                self.advance(rows, tokens)
                feed = torch.tensor(tokens, dtype=torch.long, device=device)
                keep = [i for i, r in enumerate(rows) if r.finish is None]
                if len(keep) < len(rows):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.k, cache.v = cache.k.index_select(1, index), cache.v.index_select(1, index)
                    cache.key_mask = cache.key_mask.index_select(0, index)
                    rows, feed = [rows[i] for i in keep], feed[index]
            new = self.joining(name, cache.length if rows else None, len(rows), span)
            if new:
                fresh = [Row(j) for j in new]
                admitted.extend(fresh)
                width = cache.length if rows else max(len(j.prompt) for j in new)
                ids, mask = pad_left([j.prompt for j in new], width, self.tok.pad_id, device)
                joined = model.new_kv_cache(len(new), span)
                logits = model(ids, attention_mask=mask, kv_cache=joined)[:, -1].float()
                for row in fresh:
                    if row.job.temperature > 0:
                        row.generator = torch.Generator(device=device).manual_seed(row.job.seed)
                tokens = self.pick(fresh, logits)
                self.advance(fresh, tokens)
                live = [i for i, r in enumerate(fresh) if r.finish is None]
                if live:
                    index = torch.tensor(live, dtype=torch.long, device=device)
                    if not rows:
                        cache = joined
                        cache.k, cache.v = cache.k.index_select(1, index), cache.v.index_select(1, index)
                        cache.key_mask = cache.key_mask.index_select(0, index)
                    else:
                        cache.k = torch.cat([cache.k, joined.k.index_select(1, index)], 1)
                        cache.v = torch.cat([cache.v, joined.v.index_select(1, index)], 1)
                        cache.key_mask = torch.cat([cache.key_mask, joined.key_mask.index_select(0, index)], 0)
                    rows.extend(fresh[i] for i in live)
                    feed = torch.cat([feed, torch.tensor([tokens[i] for i in live], dtype=torch.long, device=device)])
                    self.widest = max(self.widest, len(rows))
            if not rows:
                return
