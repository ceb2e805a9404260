"""`gpt-pipeline serve` through the official `openai` client: a real server process on a free local port, serving
the micro chain's trained checkpoints.

What must hold: chat (streamed or not, with a system message) says what `gpt-pipeline generate` says at
temperature 0; n, seed, stop and max_tokens do what OpenAI's API says; concurrent clients are answered in one
batch, each as if alone; every bad request gets a 4xx in OpenAI's error shape and the server serves on; a client
that leaves mid-stream frees its row.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import Server, chain_copy

QUESTION, SYSTEM = "What is 2 + 3?", "Answer with the number only."
QUESTIONS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (9, 0))]


@pytest.fixture(scope="module")
def workspace(micro_chain, tmp_path_factory):
    return chain_copy(micro_chain, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(workspace):
    s = Server(workspace, "--stage", "aligned").start()
    yield s
    s.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def generate_cli(workspace, question: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--stage", "aligned", "--prompt", question,
                          *args], cwd=workspace, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def ask(question: str, system: str | None = None) -> list[dict]:
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]


def test_chat_streamed_or_not_says_what_generate_says(workspace, client):
    expected = generate_cli(workspace, QUESTION, "--system", SYSTEM, "--max-new-tokens", "24")
    assert expected.strip(), "the trained micro model answers in text"
    plain = generate_cli(workspace, QUESTION, "--max-new-tokens", "24")
    r = client.chat.completions.create(model="aligned", messages=ask(QUESTION, SYSTEM), temperature=0, max_tokens=24)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="aligned", messages=ask(QUESTION, SYSTEM), temperature=0,
                                                 max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens  # the last chunk carries the usage
    without = client.chat.completions.create(model="aligned", messages=ask(QUESTION), temperature=0, max_tokens=24)
    assert without.choices[0].message.content == plain
    assert without.usage.prompt_tokens < r.usage.prompt_tokens  # the system message was in the prompt


def test_stream_options_usage_chunk_and_a_multi_turn_conversation(client):
    chunks = list(client.chat.completions.create(model="aligned", messages=ask(QUESTION), temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])  # counted once
    first = client.chat.completions.create(model="aligned", messages=ask(QUESTION), temperature=0, max_tokens=8)
    turns = [*ask(QUESTION, SYSTEM), {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "What is 1 + 1?"}]
    r = client.chat.completions.create(model="aligned", messages=turns, temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


def test_n_seed_and_temperature(client):
    kw = dict(model="aligned", messages=ask("What is 12 + 30?"), temperature=1.0, max_tokens=12)
    r = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    again = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # the seed decides
    seen = {c.message.content for s in range(6) for c in client.chat.completions.create(n=2, seed=s, **kw).choices}
    assert len(seen) > 1, "temperature 1 samples different replies"
    greedy = client.chat.completions.create(n=2, **{**kw, "temperature": 0})
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    one = client.chat.completions.create(n=1, **{**kw, "temperature": 0})
    assert greedy.usage.completion_tokens == 2 * one.usage.completion_tokens  # usage counts every choice
    assert greedy.usage.prompt_tokens == 2 * one.usage.prompt_tokens


def test_completions_max_tokens_and_stop(client):
    r = client.completions.create(model="pretrain", prompt="The", max_tokens=16, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and text and r.usage.prompt_tokens == 2  # the document token and "The"
    assert r.usage.completion_tokens <= 16
    short = client.completions.create(model="pretrain", prompt="The", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3 and text.startswith(short.choices[0].text)
    stop = text.strip()[1:3] if len(text.strip()) > 3 else text.strip()[-1]
    cut = client.completions.create(model="pretrain", prompt="The", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text + stop)
    streamed = client.completions.create(model="pretrain", prompt="The", max_tokens=16, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text  # a stop string is never streamed
    two = client.completions.create(model="pretrain", prompt=["The", "A"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]  # one choice per prompt, decoded in one batch
    assert text.startswith(two.choices[0].text) and two.choices[0].text.startswith(short.choices[0].text)
    assert two.choices[1].text == client.completions.create(model="pretrain", prompt="A", max_tokens=4,
                                                            temperature=0).choices[0].text


def test_models_and_health(server, client):
    names = [m.id for m in client.models.list().data]
    assert names[0] == "aligned" and {"pretrain", "sft", "aligned", "sft_control"} <= set(names)
    assert health(server)["status"] == "ok"


def test_concurrent_clients_are_batched_and_answered_as_if_alone(server, client):
    alone = {q: client.chat.completions.create(model="aligned", messages=ask(q), temperature=0,
                                               max_tokens=16).choices[0].message.content for q in QUESTIONS}
    before = health(server)
    answers: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(QUESTIONS))

    def one(q: str) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            start.wait()
            answers[q] = c.chat.completions.create(model="aligned", messages=ask(q), temperature=0,
                                                   max_tokens=16).choices[0].message.content
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and set(answers) == set(QUESTIONS)
    assert answers == alone
    after = health(server)
    assert after["widest_wave"] > 1, "concurrent requests decode in one batch"
    assert after["waves"] - before["waves"] < len(QUESTIONS)


BAD = [
    ("malformed JSON", b'{"model": "aligned", "messages": [', 400, None),
    ("missing messages", {"model": "aligned"}, 400, "messages"),
    ("unknown model", {"model": "gpt-4", "messages": ask("hi")}, 404, "model"),
    ("negative max_tokens", {"model": "aligned", "messages": ask("hi"), "max_tokens": -1}, 400, "max_tokens"),
    ("temperature below 0", {"model": "aligned", "messages": ask("hi"), "temperature": -0.5}, 400, "temperature"),
    ("top_p above 1", {"model": "aligned", "messages": ask("hi"), "top_p": 1.5}, 400, "top_p"),
    ("a prompt past the context", {"model": "aligned", "messages": ask("seven " * 400)}, 400, "messages"),
    ("max_tokens past the context", {"model": "aligned", "messages": ask("hi"), "max_tokens": 100_000}, 400,
     "max_tokens"),
    ("n of 0", {"model": "aligned", "messages": ask("hi"), "n": 0}, 400, "n"),
    ("messages not a list", {"model": "aligned", "messages": "hi"}, 400, "messages"),
    ("an unknown role", {"model": "aligned", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("content a number", {"model": "aligned", "messages": [{"role": "user", "content": 3}]}, 400, None),
    ("a lone system message", {"model": "aligned", "messages": [{"role": "system", "content": "hi"}]}, 400,
     "messages"),
    ("two user turns in a row", {"model": "aligned", "messages": [*ask("a"), *ask("b")]}, 400, "messages"),
    ("five stop strings", {"model": "aligned", "messages": ask("hi"), "stop": list("abcde")}, 400, "stop"),
    ("a penalty", {"model": "aligned", "messages": ask("hi"), "presence_penalty": 1.0}, 400, None),
    ("the body a list", [1, 2, 3], 400, None),
    ("n past its bound", {"model": "aligned", "messages": ask("hi"), "n": 17}, 400, "n"),
    ("temperature a word", {"model": "aligned", "messages": ask("hi"), "temperature": "hot"}, 400, "temperature"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_its_4xx_and_the_server_serves_on(server, what, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert server.alive() and health(server)["status"] == "ok"


def test_the_official_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="aligned", messages=ask("seven " * 400))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="aligned", prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="more than 64 completions"):
        client.completions.create(model="aligned", prompt=["hi"] * 9, n=8, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="empty list"):
        client.completions.create(model="aligned", prompt=[], max_tokens=1)


def test_a_client_that_leaves_mid_stream_frees_its_row(server, client):
    body = {"model": "pretrain", "prompt": "The", "max_tokens": 120, "temperature": 1.0, "seed": 3}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 120, "left alone, this request decodes all 120 tokens"
    before = health(server)["cancelled"]
    body["stream"] = True
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun; leave now
    deadline = time.monotonic() + 20
    while health(server)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(server)["cancelled"] == before + 1
    assert health(server)["pending"] == 0
    r = client.chat.completions.create(model="aligned", messages=ask(QUESTION), temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_request_joins_a_running_batch_and_answers_as_if_alone(server, client):
    alone = client.completions.create(model="pretrain", prompt="A", max_tokens=6, temperature=0).choices[0].text
    long = {"model": "pretrain", "prompt": "The", "max_tokens": 120, "temperature": 1.0, "seed": 3, "stream": True}
    waves = health(server)["waves"]
    with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the long request is decoding
        joined = client.completions.create(model="pretrain", prompt="A", max_tokens=6, temperature=0)
        rest = [line for line in lines if line.startswith("data: ")]
    assert joined.choices[0].text == alone
    assert rest[-1] == "data: [DONE]" and len(rest) > 60  # the long one went on decoding meanwhile
    assert health(server)["waves"] == waves + 1, "the second request joined the running batch"


def test_an_error_in_generation_fails_its_requests_and_the_engine_serves_on(workspace, monkeypatch):
    import queue as queues

    from omegaconf import OmegaConf

    from pipeline.config.root import load_config
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.handoff import load_gpt
    from pipeline.serving.engine import Engine, Job

    monkeypatch.chdir(workspace)
    cfg = load_config(OmegaConf.load("params.yaml"))
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    model = load_gpt("aligned", tok.sha256)[0]
    engine = Engine(lambda name: model, tok)
    engine.start()
    events: queues.Queue = queues.Queue()

    def job(prompt: list[int]) -> Job:
        return Job("aligned", prompt, 4, 0.0, 1.0, (), 0, lambda kind, payload: events.put((kind, payload)))

    def outcome() -> tuple[str, object]:
        while True:
            kind, payload = events.get(timeout=30)
            if kind != "delta":
                return kind, payload

    forward = type(model).forward
    calls = {"n": 0}

    def broken(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a device fault")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", broken)
    try:
        engine.submit([job(tok.prompt(QUESTION))])
        kind, message = outcome()
        assert kind == "error" and "a device fault" in message  # the request fails, naming the cause
        engine.submit([job(tok.prompt(QUESTION))])
        kind, (finish, tokens) = outcome()
        assert kind == "done" and finish in ("stop", "length") and 1 <= tokens <= 4  # the thread serves on
        assert engine.thread.is_alive()
    finally:
        engine.stop()
