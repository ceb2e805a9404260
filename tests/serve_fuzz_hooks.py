"""Schemathesis hooks for tests/test_serve_fuzz.py (`st run` imports this module by the `hooks` of its config).

A schema cannot state everything a completion request must satisfy: a conversation alternates user and
assistant turns, best_of equals n, prompts x n stay within the completions one request may ask for, and prompt
plus max_tokens fit the model's context, which depends on the tokenizer. The schema-valid requests that
schemathesis generates (its positive mode) are made to satisfy the first three here, and asked for at most
MAX_TOKENS tokens, so the CPU model answers in milliseconds; a refusal for the fourth (`context_length_exceeded`,
which names its cause) is the one failure of `positive_data_acceptance` let through. Half of those that leave
`stream` out (by a hash of the body: the same half every run) are streamed, so streams, checked event by event
against the schema's `itemSchema`, are as common as whole answers. Requests meant to be invalid (negative mode)
are sent as generated.
"""
from __future__ import annotations

import json
import zlib

import schemathesis

from pipeline.serving.protocol import MAX_CHOICES

MAX_TOKENS = 8


def positive_completion(case) -> bool:
    return (case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict)
            and case.operation.path in ("/v1/chat/completions", "/v1/completions"))


@schemathesis.hook
def map_case(context, case):
    if not positive_completion(case):
        return case
    body = case.body
    if "stream" not in body:
        body["stream"] = zlib.crc32(json.dumps(body, sort_keys=True).encode("utf-8", "surrogatepass")) % 2 == 1
    if body.get("max_tokens") is None or isinstance(body["max_tokens"], int):
        body["max_tokens"] = min(body.get("max_tokens") or MAX_TOKENS, MAX_TOKENS)
    if isinstance(body.get("messages"), list):
        messages = body["messages"]
        lead = 1 if len(messages) > 1 and messages[0].get("role") in ("system", "developer") else 0
        for i, message in enumerate(messages[lead:]):
            message["role"] = "user" if i % 2 == 0 else "assistant"
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], max(1, MAX_CHOICES // prompts))
    if body.get("best_of") is not None:
        body["best_of"] = body.get("n", 1)
    return case


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a schema-valid request refused because its prompt and max_tokens overflow the
    context (the server's 400 says so)."""
    if failure.code != "ST202" or response.status_code != 400:
        return True
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return True
    return code != "context_length_exceeded"
