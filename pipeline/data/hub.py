"""Chat, preference and problem splits from a Hub dataset (or local files in its schema), by adapter.

Holds `ADAPTERS` (dataset name -> a function from one of the dataset's rows to one of ours, or None to
skip it; the kind of row each makes is `pipeline.config.sources.ADAPTER_KINDS`), `load_rows` (read a
source, map, validate, cap) and `check_sources` (every local file a config names exists). A
`data.sources.<split>` entry, or one of a `data.mixtures.<split>` list, is a `pipeline.config.sources.SourceConfig`.

Design choices:
- An adapter reads one row in its dataset's own schema and returns a row in the pipeline's schema
  (the one `prepare` generates), so every later stage reads hub data exactly as generated data.
  A row that breaks the dataset's schema (a field missing, or of the wrong type) is an error naming
  the dataset, the row and the field; a well-formed row our format cannot hold (a conversation that
  does not alternate user/assistant, an empty reply, a pair whose replies are equal) is skipped and
  counted, as is a row longer than `max_chars` (a block_size guard: `prepare` runs before there is
  a tokenizer, so the cap is in characters; SFT refuses a conversation longer than block_size).
- Rows are read in the dataset's order and the first `max_rows` kept rows are written: the same
  config gives the same files. Hub sources are streamed, so only the rows needed are fetched.
- `key` is `<dataset>:<sha256 of the question or conversation>[:16]`. Generated keys carry the eval
  partition in their hash; hub keys do not (a hub dataset brings its own train/test split), so the
  leakage audit checks hub rows only for keys, and prompts, shared between training and eval splits.
- A system message is folded into the first user message (the chat template has no system role).
  Preference rows hold one exchange; earlier turns of a multi-turn pair are folded into the prompt
  as a plain "User: ... / Assistant: ..." transcript.

Schemas assumed (from the datasets' cards; each adapter reads only these fields):
- smoltalk (HuggingFaceTB/smoltalk): {"messages": [{"role", "content"}, ...], "source": str}
- ultrachat (HuggingFaceH4/ultrachat_200k, splits train_sft/test_sft): {"prompt", "prompt_id",
  "messages": [{"role", "content"}, ...]}
- ultrafeedback (HuggingFaceH4/ultrafeedback_binarized, splits train_prefs/test_prefs): {"prompt",
  "prompt_id", "chosen": [{"role", "content"}, ...], "rejected": [...], "score_chosen", "score_rejected"}
- hh_rlhf (Anthropic/hh-rlhf): {"chosen": str, "rejected": str}, each a transcript
  "\\n\\nHuman: ...\\n\\nAssistant: ..." sharing everything but the last reply
- gsm8k (openai/gsm8k, config main): {"question": str, "answer": "worked solution\\n#### 72"}
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from pipeline.config.data import DataConfig
from pipeline.config.sources import ADAPTER_KINDS, SOURCE_FILES, SourceConfig, file_builder


class RowError(ValueError):
    """A row that breaks its dataset's schema; `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


# ------------------------------------------------------------------ reading fields

def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict, field: str) -> list[dict[str, str]]:
    value = row.get(field)
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of {{role, content}} messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{field}[{i}]", "must be a message with string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _key(family: str, content: Any) -> str:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, sort_keys=True)
    return f"{family}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _turns(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """user/assistant turns ending with a reply (system folded into the first user message), or None."""
    system = [m["content"].strip() for m in messages if m["role"] == "system"]
    turns = [{"role": m["role"], "content": m["content"].strip()} for m in messages if m["role"] != "system"]
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not turns or any(m["role"] != ("user", "assistant")[i % 2] or not m["content"] for i, m in enumerate(turns)):
        return None
    if system:
        turns[0]["content"] = "\n\n".join([*system, turns[0]["content"]])
    return turns


def _chat_row(family: str, turns: list[dict[str, str]]) -> dict[str, Any]:
    return {"messages": turns, "family": family, "key": _key(family, turns), "answer": turns[-1]["content"],
            "demo_error": None, "cot": False, "turns": len(turns) // 2, "earlier_keys": []}


def _pair_row(family: str, chosen: list[dict] | None, rejected: list[dict] | None) -> dict[str, Any] | None:
    """One preference exchange from two conversations that differ only in the last reply."""
    if not chosen or not rejected or chosen[:-1] != rejected[:-1] or chosen[-1] == rejected[-1]:
        return None
    *earlier, question = chosen[:-1]
    names = {"user": "User", "assistant": "Assistant"}
    prompt = "\n".join([*(f"{names[m['role']]}: {m['content']}" for m in earlier),
                        f"User: {question['content']}"]) if earlier else question["content"]
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"],
            "corruption": family, "family": family, "key": _key(family, chosen[:-1]), "rejected_has_end": True}


# ------------------------------------------------------------------ adapters

def smoltalk(row: dict) -> dict[str, Any] | None:
    turns = _turns(_messages(row, "messages"))
    return _chat_row("smoltalk", turns) if turns else None


def ultrachat(row: dict) -> dict[str, Any] | None:
    turns = _turns(_messages(row, "messages"))
    return _chat_row("ultrachat", turns) if turns else None


def ultrafeedback(row: dict) -> dict[str, Any] | None:
    _text(row, "prompt")  # part of the schema; the conversations repeat it as their first message
    return _pair_row("ultrafeedback", _turns(_messages(row, "chosen")), _turns(_messages(row, "rejected")))


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")


def _transcript(text: str) -> list[dict[str, str]] | None:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." as messages (None if it is not one)."""
    parts = _HH_SPEAKER.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return _turns([{"role": roles[who], "content": said} for who, said in zip(parts[1::2], parts[2::2])])


def hh_rlhf(row: dict) -> dict[str, Any] | None:
    return _pair_row("hh_rlhf", _transcript(_text(row, "chosen")), _transcript(_text(row, "rejected")))


def gsm8k(row: dict) -> dict[str, Any] | None:
    question, solution = _text(row, "question").strip(), _text(row, "answer")
    if "####" not in solution:
        raise RowError("answer", "has no final '#### <number>' line")
    answer = solution.rpartition("####")[2].strip().replace(",", "")  # graded by exact match: 1,000 -> 1000
    if not question or not answer:
        return None
    return {"prompt": question, "answer": answer, "family": "gsm8k", "key": _key("gsm8k", question)}


# name -> a function from one row of the dataset to one of ours (None: skip it); the kind of row each
# makes is declared in pipeline.config.sources.ADAPTER_KINDS, which the config is checked against
ADAPTERS: dict[str, Callable[[dict], dict[str, Any] | None]] = {
    "smoltalk": smoltalk, "ultrachat": ultrachat, "ultrafeedback": ultrafeedback, "hh_rlhf": hh_rlhf, "gsm8k": gsm8k,
}


# ------------------------------------------------------------------ the pipeline's schema

_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "chat": {"messages": list, "family": str, "key": str, "answer": str, "demo_error": (str, type(None)),
             "cot": bool, "turns": int, "earlier_keys": list},
    "preference": {"prompt": str, "chosen": str, "rejected": str, "corruption": str, "family": str, "key": str,
                   "rejected_has_end": bool},
    "problem": {"prompt": str, "answer": str, "family": str, "key": str},
}


def check_row(kind: str, row: dict) -> None:
    """Raise RowError unless `row` has exactly the fields (and types) of a `kind` row."""
    spec = _FIELDS[kind]
    if set(row) != set(spec):
        raise RowError(", ".join(sorted(set(row) ^ set(spec))), f"a {kind} row has exactly {sorted(spec)}")
    for field, types in spec.items():
        if not isinstance(row[field], types):
            raise RowError(field, f"must be {types}, got {type(row[field]).__name__}")
    if kind == "chat" and _turns(row["messages"]) != row["messages"]:
        raise RowError("messages", "must alternate user and assistant, non-empty, ending with the assistant")


def _chars(kind: str, row: dict) -> int:
    if kind == "chat":
        return sum(len(m["content"]) for m in row["messages"])
    if kind == "preference":
        return len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"]))
    return len(row["prompt"]) + len(row["answer"])


# ------------------------------------------------------------------ loading

def describe(cfg: SourceConfig) -> str:
    if cfg.source == "hub":
        return f"{cfg.path}{f' ({cfg.name})' if cfg.name else ''} split {cfg.split}"
    return f"{cfg.data_files} split {cfg.split}"


def check_sources(cfg: DataConfig) -> None:
    """Every local file `data.sources` and `data.mixtures` name exists (FileNotFoundError naming the field),
    checked before any work."""
    for where, source in cfg.entries():
        if source.source == "files":
            file_builder(source.data_files, where, SOURCE_FILES)


def load_rows(split: str, cfg: SourceConfig, field: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """The split's rows from `cfg` (read, mapped, validated, capped) and counts of what was dropped; errors name
    `field`, the config field `cfg` sits at (default data.sources.<split>)."""
    import datasets

    field = field or f"data.sources.{split}"
    where = f"{field} ({cfg.adapter}: {describe(cfg)})"
    try:
        if cfg.source == "hub":
            ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=True)
        else:
            builder = file_builder(cfg.data_files, field, SOURCE_FILES)
            ds = datasets.load_dataset(builder, data_files=cfg.data_files, split=cfg.split, streaming=True)
    except Exception as e:  # offline hub, unknown id/config/split...: one message with the fix
        raise ValueError(f"{where}: could not open the dataset ({type(e).__name__}: {e}). A hub source is "
                         "streamed, so it needs the network (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0); offline, "
                         "point source: files at a local copy in the dataset's schema") from e
    kind, adapt = ADAPTER_KINDS[cfg.adapter], ADAPTERS[cfg.adapter]
    rows: list[dict] = []
    counts = {"read": 0, "skipped": 0, "too_long": 0}
    for i, raw in enumerate(ds):
        if cfg.max_rows is not None and len(rows) >= cfg.max_rows:
            break
        counts["read"] += 1
        try:
            row = adapt(raw)
            if row is not None:
                check_row(kind, row)
        except RowError as e:
            raise ValueError(f"{where} row {i}: field {e.field!r} {e}: fix the data or pick the adapter that "
                             "matches this dataset's schema") from None
        if row is None:
            counts["skipped"] += 1
        elif cfg.max_chars is not None and _chars(kind, row) > cfg.max_chars:
            counts["too_long"] += 1
        else:
            rows.append(row)
    if not rows:
        raise ValueError(f"{where}: no usable rows ({counts}): check the split, adapter and max_chars")
    return rows, counts
