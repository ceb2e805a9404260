"""`gpt-pipeline serve` fuzzed from its own OpenAPI schema, and under load: a real server process on a free local port,
serving the micro chain's trained checkpoints (as in tests/test_serve.py).

Fuzzing: schemathesis' CLI (`st run`, in a process of its own: its pytest plugin's `from_fixture` fails under pytest
9.2, which moved `Node._nodeid`) reads the running server's /openapi.json and sends each operation its coverage cases
(every field's bounds, every type mutated) and FUZZ_EXAMPLES generated requests, valid and invalid, derandomized and
without an example database, so every run sends the same requests. tests/serve_fuzz_hooks.py keeps the valid ones
answerable in milliseconds. Every check schemathesis has must pass: no 5xx, only declared status codes and content
types, every body (each event of a stream too) as declared, valid requests accepted, invalid ones refused, 405 with
Allow for other methods. The stateful and auth checks have nothing to check here (no links between operations, no
auth), so they pass trivially. The fuzzing must also have reached the model, with whole answers and streams from both
completion endpoints.

Load: LOAD concurrent requests, good and malformed mixed, some of them abandoned by their clients mid-stream: every
good one gets a 200 with an answer as declared (greedy ones: what the same request got alone), every malformed one
its 4xx in OpenAI's error shape, the abandoned rows are freed, and the server is alive and healthy at the end.
Counts and times go to outputs/test-artifacts/serve_fuzz.json (docs/serving.md records them).
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pipeline.serving.protocol import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_SEED,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ErrorResponse,
    Health,
)

from conftest import REPO, Server, chain_copy

FUZZ_EXAMPLES = 100  # generated requests per operation, on top of the coverage phase's
ARTIFACT = REPO / "outputs" / "test-artifacts" / "serve_fuzz.json"
ST = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]
SCHEMATHESIS = f"""
seed = 1
hooks = "serve_fuzz_hooks"
continue-on-failure = true
workers = 1
request-timeout = 30

[generation]
max-examples = {FUZZ_EXAMPLES}
deterministic = true
database = "none"

[phases.stateful]
enabled = false
"""
COMPLETIONS = ("POST /v1/chat/completions", "POST /v1/completions")
LOAD = 64
QUESTIONS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (9, 0))]
PROMPTS = ["The", "A", "In the", "It", "She said", "One"]


@pytest.fixture(scope="module")
def server(micro_chain, tmp_path_factory):
    s = Server(chain_copy(micro_chain, tmp_path_factory.mktemp("served")), "--stage", "aligned").start()
    yield s
    s.stop()


def health(server) -> dict:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    return Health.model_validate(r.json()).model_dump()


def record(**numbers) -> None:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(ARTIFACT.read_text()) if ARTIFACT.is_file() else {}
    ARTIFACT.write_text(json.dumps({**old, **numbers}, indent=2) + "\n")


def answers(ndjson) -> collections.Counter:
    """(operation, "positive" | "negative", status, media type) -> how many responses, from st's NDJSON events."""
    seen = collections.Counter()
    for line in ndjson.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if not scenario or "interactions" not in scenario["recorder"]:
            continue
        rec = scenario["recorder"]
        for case_id, exchange in rec["interactions"].items():
            mode = rec["cases"][case_id]["value"]["meta"]["generation"]["mode"]
            response = exchange["response"]
            media = (response["headers"].get("content-type") or ["none"])[0].split(";")[0]
            seen[rec["label"], mode, response["status_code"], media] += 1
    return seen


@pytest.mark.multiprocess  # st runs beside the server
def test_schemathesis_finds_no_failure(server, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS)
    start = time.monotonic()
    proc = subprocess.run([*ST, "--config-file", str(config), "--no-color", "run", server.url + "/openapi.json",
                           "--checks", "all", "--report", "json,ndjson", "--report-dir", str(tmp_path),
                           "--output-sanitize", "false"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(REPO / "tests"), os.environ.get("PYTHONPATH")]))})
    wall = time.monotonic() - start
    report = json.loads(next(tmp_path.glob("json-*.json")).read_text())
    out = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0 and not report["failures"] and not report["errors"], out
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert report["operations"]["tested"] == sum(len(ops) for ops in schema["paths"].values()) == 5, out
    seen = answers(next(tmp_path.glob("ndjson-*.ndjson")))
    assert sum(seen.values()) == report["test_cases"]["generated"]
    for op in COMPLETIONS:  # the fuzzing reached the model, both ways, and was refused as often
        assert seen[op, "positive", 200, "application/json"] >= 40, seen
        assert seen[op, "positive", 200, "text/event-stream"] >= 10, seen
        assert sum(v for (o, mode, status, _), v in seen.items() if o == op and mode == "negative"
                   and 400 <= status < 500) >= 100, seen
    assert not any(status >= 500 for (_, _, status, _) in seen)
    assert server.alive() and health(server)["pending"] == 0
    record(fuzz={"operations": report["operations"]["tested"], "cases": report["test_cases"]["generated"],
                 "failures": len(report["failures"]), "wall_s": round(wall, 1),
                 "answers": {" ".join(map(str, k)): v for k, v in sorted(seen.items())}})


# ------------------------------------------------------------------ load


def malformed() -> list[tuple[str, dict | bytes | list[bytes], int, str | None]]:
    """(endpoint, body, status, error code) of each malformed request (a list of bytes: sent chunked, without a
    Content-Length)."""
    chat = {"model": "aligned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    done = {"model": "aligned", "prompt": "hi", "max_tokens": 4}
    return [
        ("chat", b'{"model": "aligned", "messages": [', 400, "json_invalid"),
        ("chat", b"", 400, "missing"),
        ("chat", {**chat, "n": "2"}, 400, "int_type"),
        ("chat", {**chat, "messages": "hi"}, 400, "list_type"),
        ("chat", {**chat, "temperature": "hot"}, 400, "float_type"),
        ("chat", {**chat, "model": "gpt-4"}, 404, "model_not_found"),
        ("chat", {**chat, "messages": [{"role": "user", "content": "seven " * 400}]}, 400, "context_length_exceeded"),
        ("completions", {**done, "prompt": "seven " * (MAX_BODY_BYTES // 6 + 1)}, 413, "request_too_large"),
        ("completions", [b'{"prompt": "'] + [b"seven " * 10_000] * (MAX_BODY_BYTES // 60_000 + 1), 413,
         "request_too_large"),
        ("completions", {**done, "prompt": "\ud800"}, 400, "value_error"),
        ("completions", {**done, "prompt": ["hi"] * (MAX_CHOICES + 1)}, 400, "value_error"),
        ("chat", {**chat, "tools": [{"type": "function"}]}, 400, "unsupported_value"),
        ("chat", {**chat, "stop": list("abcde")}, 400, "value_error"),
        ("completions", {**done, "stream": "yes"}, 400, "bool_type"),
        ("completions", {**done, "seed": 2**64}, 400, "less_than_equal"),  # torch.Generator's seed: 64 bits
    ]


def sse(lines: list[str], chunk) -> tuple[str, str | None, dict | None]:
    """(text, last finish_reason, usage) of a stream's `data:` lines, each chunk validated as declared."""
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    text, finish, usage = "", None, None
    for raw in data[:-1]:
        c = chunk.model_validate_json(raw)
        for choice in c.choices:
            text += (choice.delta.content or "") if chunk is ChatCompletionChunk else choice.text
            finish = choice.finish_reason or finish
        usage = c.usage or usage
    return text, finish, usage


async def load(server, alone_chat: dict, alone_text: dict) -> dict:
    base = server.url
    limits = httpx.Limits(max_connections=LOAD + 8, max_keepalive_connections=LOAD + 8)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http, \
            openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60,
                               http_client=httpx.AsyncClient(limits=limits, timeout=60)) as client:
        start = asyncio.Event()

        async def chat(q: str) -> str:
            await start.wait()
            r = await client.chat.completions.create(model="aligned", messages=[{"role": "user", "content": q}],
                                                     temperature=0, max_tokens=8)
            ChatCompletion.model_validate(r.model_dump())
            assert r.choices[0].message.content == alone_chat[q], q
            return "good"

        async def chat_stream(q: str, usage_chunk: bool = False) -> str:
            await start.wait()
            stream = await client.chat.completions.create(model="aligned", stream=True, temperature=0, max_tokens=8,
                                                          messages=[{"role": "user", "content": q}],
                                                          stream_options={"include_usage": usage_chunk})
            chunks = [c async for c in stream]
            for c in chunks:
                ChatCompletionChunk.model_validate(c.model_dump())
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone_chat[q], q
            assert chunks[-1].usage.completion_tokens >= 1 and (chunks[-1].choices == []) == usage_chunk
            return "good"

        async def chat_sampled(seed: int, max_tokens: int | None, temperature: float = 1.0,
                               top_p: float = 1.0) -> str:
            await start.wait()
            r = await client.chat.completions.create(model="aligned", messages=[{"role": "user", "content": "Hi"}],
                                                     temperature=temperature, top_p=top_p, n=2, seed=seed,
                                                     max_tokens=max_tokens)
            ChatCompletion.model_validate(r.model_dump())
            assert [c.index for c in r.choices] == [0, 1] and r.usage.total_tokens <= 2 * 128
            return "good"

        async def complete(prompt: str, stream: bool) -> str:
            await start.wait()
            body = {"model": "pretrain", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
            if stream:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    text, finish, usage = sse([line async for line in r.aiter_lines()], CompletionChunk)
                assert finish in ("stop", "length") and usage.completion_tokens >= 1
            else:
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                text = Completion.model_validate(r.json()).choices[0].text
            assert text == alone_text[prompt], prompt
            return "good"

        async def leave(stream: bool) -> str:
            """A client that goes away: a stream closed after its first event, or a request given up on."""
            await start.wait()
            body = {"model": "pretrain", "prompt": "The", "max_tokens": 120, "temperature": 1.0, "seed": 3,
                    "stream": stream}
            if stream:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
            else:
                with pytest.raises(httpx.TimeoutException):
                    await http.post("/v1/completions", json=body, timeout=0.05)
            return "left"

        async def bad(endpoint: str, body: dict | bytes | list[bytes], status: int, code: str | None) -> str:
            await start.wait()
            if isinstance(body, list):
                async def chunks():
                    for piece in body:
                        yield piece
                content, size = chunks(), sum(map(len, body))
            else:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                size = len(content)
            r = await http.post(f"/v1/{endpoint.replace('chat', 'chat/completions')}", content=content,
                                headers={"content-type": "application/json"})
            assert r.status_code == status, (body if size < 500 else size, r.text)
            error = ErrorResponse.model_validate(r.json()).error
            assert error.message and error.code == code, error
            return "malformed"

        tasks = [chat(q) for q in (QUESTIONS * 3)[:21]] + [chat_stream(q) for q in QUESTIONS]
        tasks += [chat_stream(q, usage_chunk=True) for q in QUESTIONS[:2]]
        tasks += [complete(p, stream=False) for p in PROMPTS] + [complete(p, stream=True) for p in PROMPTS]
        tasks += [chat_sampled(1, 8), chat_sampled(2, None), leave(True), leave(True), leave(False)]
        # the smallest temperature and top_p there are, the largest seed (seed + 1 for the second choice)
        tasks += [chat_sampled(MAX_SEED, 4, temperature=5e-324, top_p=5e-324)]
        tasks += [bad(*m) for m in malformed()]
        assert len(tasks) == LOAD
        running = [asyncio.ensure_future(t) for t in tasks]
        await asyncio.sleep(0.2)  # every request waits at the start line
        t0 = time.monotonic()
        start.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*running), 120)
        return {"wall_s": round(time.monotonic() - t0, 2), **collections.Counter(outcomes)}


def test_64_concurrent_requests_good_and_malformed(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        alone_chat = {q: http.post("/v1/chat/completions", json={
            "model": "aligned", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8,
        }).json()["choices"][0]["message"]["content"] for q in QUESTIONS}
        alone_text = {p: http.post("/v1/completions", json={"model": "pretrain", "prompt": p, "max_tokens": 8,
                                                             "temperature": 0}).json()["choices"][0]["text"]
                      for p in PROMPTS}
    before = health(server)
    result = asyncio.run(load(server, alone_chat, alone_text))
    assert result["good"] == LOAD - 3 - len(malformed()) and result["malformed"] == len(malformed())
    deadline = time.monotonic() + 20
    while (health(server)["pending"] or health(server)["cancelled"] - before["cancelled"] < 2) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    after = health(server)
    assert after["pending"] == 0
    assert 2 <= after["cancelled"] - before["cancelled"] <= 3, "the abandoned streams' rows were freed"
    assert after["widest_wave"] > 1 and server.alive()
    assert "Traceback" not in server.log.read_text()
    record(load={"requests": LOAD, "good": result["good"], "malformed": result["malformed"], "abandoned": 3,
                 "cancelled_rows": after["cancelled"] - before["cancelled"], "waves": after["waves"] - before["waves"],
                 "widest_wave": after["widest_wave"], "wall_s": result["wall_s"]})
