"""`gpt-pipeline serve`: the chain's checkpoints behind an OpenAI-compatible HTTP API, and a chat page.

    POST /v1/chat/completions   messages in the tokenizer's chat template (a leading system message folded in)
    POST /v1/completions        raw text after the document token
    GET  /v1/models             the language-model checkpoints this workspace holds
    GET  /health                liveness, the checkpoints, the queue
    GET  /                      the chat page (pipeline/serving/static/index.html)

Both completion endpoints honour temperature, top_p, max_tokens, stop, seed and n, stream as server-sent
events when `stream` is set, and report usage (prompt, completion and total tokens) in every response; a
stream's last chunk carries it, and `stream_options.include_usage` adds OpenAI's separate usage chunk. Requests
decode together in the engine's waves (pipeline/serving/engine.py). A bad request gets a 4xx in OpenAI's error
shape before any work (a body over MAX_BODY_BYTES a 413 before it is read); a client that disconnects cancels
its rows. /openapi.json declares every status each endpoint answers with and the body of each (the models of
pipeline/serving/protocol.py, the served models and their largest context included).

FastAPI and uvicorn, not LitServe: FastAPI validates the OpenAI bodies with pydantic (the config schemas' library)
and streams token by token from one event loop, while one generation thread owns the model and batches across
requests itself. LitServe batches too, but per request and in worker processes of its own, which would keep the
rows of concurrent requests apart and load the model once per worker.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import reprlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from pipeline.data.tokenizer import ChatTokenizer
from pipeline.serving.engine import Engine, Job
from pipeline.serving.protocol import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    Sampling,
    declare,
    error_body,
    field_path,
    streamed,
)

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
POLL_S = 0.5  # how often a waiting non-streamed request asks whether its client is still there


REFUSED = {status: {"model": ErrorResponse, "description": why} for status, why in (
    (400, "a malformed request, a value out of range, an unsupported option, a prompt past the context"),
    (404, "an unknown model"), (413, f"a request body over {MAX_BODY_BYTES} bytes"),
    (500, "generation failed (the server serves on)"))}


def completion(body: type, chunk: type) -> dict:
    """The OpenAPI responses of a completion endpoint: `body` (or a stream of `chunk`s), or an error."""
    return {200: {"model": body, "description": "the completion, or with `stream` its chunks as server-sent events",
                  "content": streamed(chunk)}, **REFUSED}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, refused by its Content-Length before it is read,
    or as its chunks arrive (a body without one)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            body = error_body(self.refusal(), code="request_too_large")
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException raised while it reads the body on
                raise HTTPException(413, self.refusal())
            return message

        await self.app(scope, counted, send)

    def refusal(self) -> str:
        return f"the request body is over this server's limit of {self.limit} bytes: shorten the prompt"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    block_size: int
    created: int


class Choices:
    """The events of one request's jobs, gathered on the event loop."""

    def __init__(self, n: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str, object]] = asyncio.Queue()
        self.text = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.open = n

    def emitter(self, index: int):
        return lambda kind, payload: self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

    def take(self, index: int, kind: str, payload: object) -> None:
        if kind == "delta":
            self.text[index] += payload
        elif kind == "done":
            self.finish[index], self.tokens[index] = payload
            self.open -= 1
        else:
            raise APIError(500, str(payload), type="server_error")


def create_app(tok: ChatTokenizer, engine: Engine, checkpoints: dict[str, Checkpoint], default: str) -> FastAPI:
    """The FastAPI app over a started `engine`; `checkpoints`: what may be asked for, `default` first."""
    app = FastAPI(title="gpt-pipeline", description="OpenAI-compatible serving of the chain's checkpoints")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def openapi() -> dict:
        if app.openapi_schema is None:
            declare(FastAPI.openapi(app), list(checkpoints), max(c.block_size for c in checkpoints.values()))
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)  # Starlette's own: an unknown path, a method not allowed, a 413
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        message = f"{err.detail}: {request.method} {request.url.path}" if err.status_code in (404, 405) else err.detail
        return JSONResponse(error_body(message, code=code), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        found = err.errors()
        # of a union's members' errors (a field's first), the deepest: the member the value got furthest in
        first = max((e for e in found if e.get("loc", ())[:2] == found[0].get("loc", ())[:2]),
                    key=lambda e: len(e.get("loc", ())))
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('msg')}", None
        else:
            param = field_path(first.get("loc", ()))
            got = reprlib.repr(first["input"]) if "input" in first and param else None  # bounded: inputs can be big
            message = f"{param or 'body'}: {first.get('msg')}" + (f" (got {got})" if got else "")
        return JSONResponse(error_body(message, param=param, code=first.get("type")), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # the request fails; the server serves on
        log.exception("request failed")
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)

    def checkpoint(name: str) -> Checkpoint:
        if name not in checkpoints:
            raise APIError(404, f"the model {name!r} does not exist: choose one of {sorted(checkpoints)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        return checkpoints[name]

    def budget(req: Sampling, ckpt: Checkpoint, prompt: list[int], chat: bool) -> int:
        room = ckpt.block_size - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, and model {ckpt.name!r}'s context is "
                           f"{ckpt.block_size}: shorten the {'conversation' if chat else 'prompt'}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(400, f"max_tokens ({req.max_tokens}) plus the prompt's {len(prompt)} tokens exceed "
                           f"model {ckpt.name!r}'s context of {ckpt.block_size}: ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return req.max_tokens or room

    def jobs(req: Sampling, prompts: list[list[int]], choices: Choices, chat: bool) -> list[Job]:
        ckpt = checkpoint(req.model)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} ask for more than {MAX_CHOICES} completions in "
                           "one request: split it", param="n", code="too_many_completions")
        budgets = [budget(req, ckpt, p, chat) for p in prompts]
        base = req.seed if req.seed is not None else random.randrange(2**31)
        out = []
        for p, (prompt, max_tokens) in enumerate(zip(prompts, budgets)):
            for c in range(req.n):
                index = p * req.n + c
                out.append(Job(req.model, prompt, max_tokens, req.temperature, req.top_p, tuple(req.stop), base + index,
                               choices.emitter(index)))
        return out

    def usage(prompts: list[list[int]], n: int, choices: Choices) -> dict:
        prompt_tokens = sum(len(p) for p in prompts) * n
        completion = sum(choices.tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def wait(request: Request, choices: Choices, submitted: list[Job]) -> None:
        """Until every choice is done; a client gone away cancels its jobs."""
        while choices.open:
            try:
                event = await asyncio.wait_for(choices.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for job in submitted:
                        job.cancelled.set()
                    raise APIError(499, "the client closed the request") from None
                continue
            choices.take(*event)

    async def respond(request: Request, req: Sampling, prompts: list[list[int]], chat: bool):
        choices = Choices(len(prompts) * req.n)
        submitted = jobs(req, prompts, choices, chat)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None}
        engine.submit(submitted)
        if req.stream:
            return StreamingResponse(stream(req, prompts, choices, submitted, head, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await wait(request, choices, submitted)
        finally:
            for job in submitted:
                job.cancelled.set()  # no-op for finished jobs
        if chat:
            listed = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                       "logprobs": None} for i, (t, f) in enumerate(zip(choices.text, choices.finish))]
        else:
            listed = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                      for i, (t, f) in enumerate(zip(choices.text, choices.finish))]
        return {**head, "object": kind, "choices": listed, "usage": usage(prompts, req.n, choices)}

    async def stream(req: Sampling, prompts: list[list[int]], choices: Choices, submitted: list[Job], head: dict,
                     chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, **extra) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if text == "" and finish is None:
                    delta["role"] = "assistant"
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **extra})}\n\n"

        try:
            if chat:
                for i in range(len(choices.text)):
                    yield chunk(i, "", None)
            while choices.open:
                index, event, payload = await choices.events.get()
                if event == "error":
                    yield f"data: {json.dumps(error_body(str(payload), 'server_error'))}\n\n"
                    return
                choices.take(index, event, payload)
                if event == "delta":
                    yield chunk(index, payload, None)
                elif choices.open:
                    yield chunk(index, None, choices.finish[index])
                elif req.include_usage:  # OpenAI's usage chunk follows
                    yield chunk(index, None, choices.finish[index], usage=None)
                else:  # the last choice to finish carries the usage
                    yield chunk(index, None, choices.finish[index], usage=usage(prompts, req.n, choices))
            if req.include_usage:
                tail = {**head, "object": kind, "choices": [], "usage": usage(prompts, req.n, choices)}
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the stream is cancelled and its rows freed
            for job in submitted:
                job.cancelled.set()

    @app.post("/v1/chat/completions", responses=completion(ChatCompletion, ChatCompletionChunk))
    async def chat_completions(req: ChatRequest, request: Request):
        checkpoint(req.model)
        try:
            prompt = tok.render(req.conversation(), add_generation_prompt=True)
        except ValueError as err:  # the template's refusal (roles out of order, a lone system message)
            raise APIError(400, f"messages: {err}", param="messages") from None
        return await respond(request, req, [prompt], chat=True)

    @app.post("/v1/completions", responses=completion(Completion, CompletionChunk))
    async def completions(req: CompletionRequest, request: Request):
        checkpoint(req.model)
        prompts = [[tok.bos_id, *tok.encode(text)] for text in req.prompts()]
        return await respond(request, req, prompts, chat=False)

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def models():
        return {"object": "list", "data": [{"id": c.name, "object": "model", "created": c.created,
                                             "owned_by": "gpt-pipeline", "context_length": c.block_size}
                                            for c in sorted(checkpoints.values(), key=lambda c: c.name != default)]}

    @app.get("/health", responses={200: {"model": Health}})
    async def health():
        return {"status": "ok", "default_model": default, "models": list(checkpoints), "pending": engine.pending(),
                "waves": engine.waves, "widest_wave": engine.widest, "cancelled": engine.cancelled}

    @app.get("/", response_class=HTMLResponse, responses={404: {"model": ErrorResponse,
                                                                  "description": "the page is missing"}})
    async def page():
        if not PAGE.is_file():
            raise APIError(404, f"{PAGE} is missing from this installation", code="not_found")
        return HTMLResponse(PAGE.read_text())

    return app
