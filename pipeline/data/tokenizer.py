"""Byte-level BPE with chat special tokens, and the chat template built on it.

Training uses HF `tokenizers`: digits are split one per token before the byte-level step (as in
LLaMA/nanochat) so arithmetic sees a consistent place-value alphabet instead of arbitrary merges.
The special tokens are added first, so their ids are small and fixed: pad=0, bos=1, user=2,
assistant=3, end=4 for the default list.

The chat template is token-level, never string-level, so user text can't forge a special token:
    <|bos|> <|user|> question <|assistant|> answer <|end|> [<|user|> question <|assistant|> answer <|end|> ...]
SFT puts loss on every `answer <|end|>` only; generation stops at `<|end|>`.

A checkpoint taken with `model.init_from=hf:DIR` whose tokenizer has its own Jinja chat template keeps
that template instead (`TemplateTokenizer`, the same interface; `pipeline.data.chat_template` renders it
and finds the replies in it) and gains none of the pipeline's special tokens: its ids are what
transformers' `apply_chat_template` gives, the loss falls on each reply and its end-of-turn token, and
generation stops at that token. `load_tokenizer` returns whichever the `tokenizer` stage wrote.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config.data import ROLES
from pipeline.data.chat_template import (
    MARK_END,
    MARK_START,
    TEMPLATE_FILE,
    TOKENS_FILE,
    ChatTemplate,
    Reply,
    control_pattern,
    control_tokens,
    mark,
)
from pipeline.input_files import json_problem, require_file
from pipeline.io import file_sha256
from pipeline.paths import TOKENIZER_FILE

IGNORE_INDEX = -100
RERUN = "run the `tokenizer` stage (dvc repro tokenizer)"


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the special tokens take the first ids in order.

    `vocab_size` and `special_tokens` are the checked `tokenizer` config (pipeline.config.data)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=alphabet, min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class ChatTokenizer:
    """A trained `tokenizers.Tokenizer` plus the ids and template of the chat format."""

    def __init__(self, tok: Tokenizer, special_tokens: list[str], sha256: str = "") -> None:
        self.tok = tok
        # text that merely looks like "<|end|>" is encoded as bytes, never as the control token
        self.tok.encode_special_tokens = True
        self.sha256 = sha256
        self.special_tokens = list(special_tokens)
        ids = {}
        for role, token in zip(ROLES, special_tokens):
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"special token {token!r} ({role}) is not in the tokenizer vocabulary")
            ids[role] = tid
        self.pad_id, self.bos_id = ids["pad"], ids["bos"]
        self.user_id, self.assistant_id, self.end_id = ids["user"], ids["assistant"], ids["end"]
        self.special_ids = frozenset(ids.values())

    def __setstate__(self, state: dict) -> None:
        # a pickled `Tokenizer` (DataLoader or `datasets` workers) forgets encode_special_tokens
        self.__dict__.update(state)
        self.tok.encode_special_tokens = True

    @classmethod
    def load(cls, path: str | Path, special_tokens: Sequence[str]) -> ChatTokenizer:
        path = Path(path)
        tok = read_tokenizer(path, RERUN)
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing} named in tokenizer.special_tokens: rerun "
                             "`dvc repro tokenizer`, or set tokenizer.special_tokens to the tokens it was trained with")
        return cls(tok, list(special_tokens), file_sha256(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @cached_property
    def widest_token(self) -> int:
        """The most bytes of text one token spans: byte-level BPE writes one vocabulary character per byte, and
        text never encodes to the added (special) tokens (`encode_special_tokens`)."""
        added = set(self.tok.get_added_tokens_decoder())
        return max((len(t) for t, i in self.tok.get_vocab().items() if i not in added), default=1)

    def encode(self, text: str) -> list[int]:
        # special tokens typed as text by a user stay plain bytes, never control tokens
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    def prompt(self, question: str) -> list[int]:
        """Tokens that ask the model to answer `question` (ends with the assistant token)."""
        return [self.bos_id, self.user_id, *self.encode(question), self.assistant_id]

    def chat(self, messages: list[dict], with_end: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a conversation of alternating user and assistant messages, after an optional
        leading system message (folded into the first user turn: `fold_system`): labels are IGNORE_INDEX except
        on every assistant reply and its end token (`with_end=False` leaves the last reply open)."""
        messages = fold_system(messages)
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for i, message in enumerate(messages):
            role = "user" if i % 2 == 0 else "assistant"
            if message["role"] != role:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {role!r}: a conversation "
                                 "alternates user and assistant messages, starting with the user")
            text = list(message["ids"]) if "ids" in message else self.encode(message["content"])
            if role == "user":
                part = [self.user_id, *text, self.assistant_id]
                ids += part
                labels += [IGNORE_INDEX] * len(part)
            else:
                part = text + ([self.end_id] if with_end or i < len(messages) - 1 else [])
                ids += part
                labels += part
        return ids, labels

    def conversation(self, question: str, answer: str, with_end: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) for one exchange; labels are IGNORE_INDEX except on the answer (+ end)."""
        return self.chat([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], with_end)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation, opening the assistant's turn after it when `add_generation_prompt` (as the
        exported Jinja template, `hf_tokenizer_config`, renders it). A message may carry `ids`, the exact tokens
        of its content (a sampled reply), which are used instead of encoding its text again."""
        ids, _ = self.chat(messages)
        last = messages[-1]["role"] if messages else None  # a lone system message is refused by chat()
        if add_generation_prompt and last != "user":
            ids.append(self.assistant_id)
        elif not add_generation_prompt and last == "user":
            ids.pop()  # the user turn ends where the assistant's begins
        return ids

    def strip_response(self, ids: list[int]) -> list[int]:
        """Cut a generated response at the first end token (exclusive)."""
        return ids[:ids.index(self.end_id)] if self.end_id in ids else ids

    def hf_token_ids(self) -> dict[str, int | None]:
        """pad/bos/eos ids for a transformers config.json and generation_config.json (eos: where generation stops)."""
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.end_id}

    def hf_tokenizer_config(self, block_size: int) -> dict:
        """tokenizer_config.json for `AutoTokenizer.from_pretrained`, with the chat template as Jinja."""
        pad, bos, user, assistant, end = self.special_tokens[:5]
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": end, "pad_token": pad,
                "additional_special_tokens": [user, assistant], "model_max_length": block_size,
                "clean_up_tokenization_spaces": False, "chat_template": chat_template(self.special_tokens)}


class TemplateTokenizer(ChatTokenizer):
    """A checkpoint's tokenizer with its own Jinja chat template (`ChatTemplate`), behind ChatTokenizer's interface.

    `tok` encodes plain text, where a special token spelled out stays text; `control` encodes what the
    template renders, where the control tokens it writes are tokens (and those that came from message text
    arrive marked, and are encoded as text). `bos_id` opens each pretraining document (the template's
    `document` token: bos, else a token other than the end of turn); no single token opens a user or an
    assistant turn, so `user_id` and `assistant_id` are None."""

    def __init__(self, tok: Tokenizer, template: ChatTemplate, sha256: str = "") -> None:
        self.tok, self.template, self.sha256 = tok, template, sha256
        self.tok.encode_special_tokens = True
        self.control = Tokenizer.from_str(tok.to_str())
        ids = {}
        for field in ("end_of_turn", "document", "pad"):
            ids[field] = tok.token_to_id(getattr(template, field))
            if ids[field] is None:
                raise ValueError(f"{template.where}: the {field} token {getattr(template, field)!r} is not in the "
                                 "tokenizer's vocabulary: rerun `dvc repro tokenizer`")
        self.end_id, self.bos_id, self.pad_id = ids["end_of_turn"], ids["document"], ids["pad"]
        self.user_id = self.assistant_id = None
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self.special_tokens = control_tokens(tok, template.source)
        self._controls = control_pattern(self.special_tokens)
        self._marked = re.compile(f"{MARK_START}({self._controls.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.control.encode_special_tokens = False

    @classmethod
    def load(cls, path: str | Path, special_tokens: Sequence[str] = ()) -> TemplateTokenizer:
        """artifacts/tokenizer as the tokenizer stage wrote it (`special_tokens` unused: the template has its own).
        `sha256` covers tokenizer.json, the template and its tokens: a new template invalidates the checkpoints."""
        path = Path(path)
        tok = read_tokenizer(path, RERUN)
        files = (path, path.parent / TEMPLATE_FILE, path.parent / TOKENS_FILE)
        template = ChatTemplate.load(path.parent)
        return cls(tok, template, hashlib.sha256("".join(map(file_sha256, files)).encode()).hexdigest())

    def _marked_messages(self, messages: list[dict]) -> list[dict]:
        # what the template sees: no None values (as transformers), no `ids`, control tokens in text marked
        return [mark({k: v for k, v in m.items() if v is not None and k != "ids"}, self._controls) for m in messages]

    def _encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and character offsets of a rendered conversation, the markers dropped."""
        if MARK_START not in text and MARK_END not in text:  # the template's own text only: as transformers encodes
            enc = self.control.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []

        def add(piece: str, at: int, tok: Tokenizer) -> None:
            enc = tok.encode(piece, add_special_tokens=False)
            ids.extend(enc.ids)
            offsets.extend((at + s, at + e) for s, e in enc.offsets)

        pos = 0
        for m in self._marked.finditer(text):
            add(text[pos:m.start()], pos, self.control)
            if m.group(1):  # a control token from message text, as plain text
                n = len(ids)
                add(m.group(1), m.start() + 1, self.tok)
                if self.tok.token_to_id(m.group(1)) in ids[n:]:
                    raise ValueError(f"message text spells {m.group(1)!r}, an added token of the tokenizer that even "
                                     "plain text encodes to, so it can't be kept from acting as a control token")
            pos = m.end()  # a lone marker (the template split a marked token apart) is dropped
        add(text[pos:], pos, self.control)
        return ids, offsets

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation as the template renders it (`ids` on a message is ignored: a string
        template renders text)."""
        return self._encode_rendered(self.template.render(self._marked_messages(messages), add_generation_prompt))[0]

    def prompt(self, question: str) -> list[int]:
        """Tokens that ask the model to answer `question`: the template with add_generation_prompt."""
        return self.render([{"role": "user", "content": question}])

    def chat(self, messages: list[dict], with_end: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a conversation: labels are IGNORE_INDEX except on the tokens of every assistant
        reply and its end-of-turn token (`with_end=False` leaves a last reply open)."""
        marked = self._marked_messages(messages)
        text, replies, _ = self.template.replies(marked)
        if not with_end and marked and marked[-1].get("role") == "assistant":
            last = replies[-1]
            text, replies = text[:last.content_end], [*replies[:-1], Reply(last.start, last.content_end,
                                                                             last.content_end)]
        ids, offsets = self._encode_rendered(text)
        labels = [IGNORE_INDEX] * len(ids)
        spans = iter(replies)
        span = next(spans, None)
        for j, (start, end) in enumerate(offsets):  # a token overlapping a reply is the reply's (as transformers)
            while span is not None and start >= span.end:
                span = next(spans, None)
            if span is None:
                break
            if end > span.start:
                labels[j] = ids[j]
        return ids, labels

    def hf_tokenizer_config(self, block_size: int) -> dict:
        """tokenizer_config.json with the adopted template and the checkpoint's own bos/eos tokens (what the template
        renders with); pad is the one the pipeline pads with."""
        t = self.template
        eos = t.eos_token or t.end_of_turn
        named = {t.bos_token, eos, t.pad}
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": t.bos_token, "eos_token": eos,
                "pad_token": t.pad, "additional_special_tokens": [c for c in self.special_tokens if c not in named],
                "model_max_length": block_size, "clean_up_tokenization_spaces": False, "chat_template": t.source}


def bounded_length(tok: ChatTokenizer, nbytes: int, specials: int, limit: int,
                   count: Callable[[], int]) -> tuple[int, str]:
    """The length of a text of `nbytes` UTF-8 bytes encoded with `specials` special tokens, as (tokens, qualifier),
    told apart from `limit` without tokenizing where the bytes decide it: under the pipeline's byte-level BPE a token
    spans 1 to `widest_token` bytes, so (bytes + specials, "at most ") when even a token per byte fits `limit`, and
    (bytes / widest + specials, "at least ") when even the widest tokens exceed it; else `count()` tokenizes and the
    qualifier is "". A checkpoint's own template (TemplateTokenizer) is always counted. So a 10 MB text is refused
    in microseconds instead of tokenized for seconds."""
    if type(tok) is ChatTokenizer:
        if nbytes + specials <= limit:
            return nbytes + specials, "at most "
        fewest = -(-nbytes // tok.widest_token) + specials
        if fewest > limit:
            return fewest, "at least "
    return count(), ""


SYSTEM_SEPARATOR = "\n\n"  # between a folded system message and the first user message


def fold_system(messages: list[dict]) -> list[dict]:
    """`messages` with a leading system message folded into the first user message (its content, a blank line,
    the user's content), the way the exported template folds it: the pipeline's models have no system role token,
    and a new one would change the tokenizer (and so every checkpoint). Other messages are returned as they are."""
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    system, user = messages[0]["content"], messages[1]
    folded = {"role": "user", "content": system + SYSTEM_SEPARATOR + user["content"]}
    return [folded, *messages[2:]]  # a folded turn is text: its `ids`, if any, no longer describe it


def chat_template(special_tokens: Sequence[str]) -> str:
    """Jinja rendering of ChatTokenizer.chat/prompt: <|bos|> (<|user|> q <|assistant|> a <|end|>)* ...

    The user turn ends where the assistant's begins, so `add_generation_prompt=True` after a user
    message gives exactly `ChatTokenizer.prompt(q)`. A leading system message is folded into the first
    user turn (`fold_system`), which OpenAI-style clients send. Unlike the pipeline's token-level template,
    a string template lets message text that spells a special token become that token.
    """
    _, bos, user, assistant, end = special_tokens[:5]
    sep = SYSTEM_SEPARATOR.replace("\n", "\\n")
    return ("{{ '" + bos + "' }}"
            "{% set system = '' %}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% if messages | length < 2 or messages[1]['role'] != 'user' %}"
            "{{ raise_exception('a system message must be followed by a user message') }}"
            "{% endif %}"
            "{% set system = messages[0]['content'] + '" + sep + "' %}"
            "{% set messages = messages[1:] %}"
            "{% endif %}"
            "{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('a conversation alternates user and assistant messages, starting with the user') }}"
            "{% endif %}"
            "{% if message['role'] == 'user' %}"
            "{{ '" + user + "' + (system if loop.first else '') + message['content'] }}"
            "{% else %}{{ '" + assistant + "' + message['content'] + '" + end + "' }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + assistant + "' }}{% endif %}")


def read_tokenizer(path: Path, fix: str) -> Tokenizer:
    """The tokenizers.Tokenizer in `path`; a missing or unreadable file is refused, naming it and `fix` (and, where
    the file is not even JSON, the line and column, which the Rust parser's message lacks for bytes)."""
    require_file(path, fix)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises a bare Exception for any unreadable file
        problem = json_problem(path.read_bytes())[0] or str(err)
        raise ValueError(f"{path} is not a readable tokenizer ({problem}): {fix}") from None


def load_tokenizer(special_tokens: Sequence[str], path: str | Path = TOKENIZER_FILE) -> ChatTokenizer:
    """The workspace's tokenizer (artifacts/tokenizer, written by the tokenizer stage): a TemplateTokenizer where
    the stage adopted a checkpoint's chat template (chat_template.jinja beside tokenizer.json), else the pipeline's
    template on `special_tokens`."""
    path = Path(path)
    if (path.parent / TEMPLATE_FILE).is_file():
        return TemplateTokenizer.load(path)
    return ChatTokenizer.load(path, special_tokens)


def import_tokenizer(directory: Path, special_tokens: Sequence[str]) -> Tokenizer:
    """A transformers checkpoint's tokenizer.json (`model.init_from`): its ids are what the imported weights know.
    Without a chat template of its own, any of the pipeline's special tokens it lacks are appended after its
    vocabulary (the pipeline's template needs them); with one, it is taken unchanged."""
    file = directory / "tokenizer.json"
    require_file(file, "model.init_from needs a transformers fast tokenizer's tokenizer.json",
                 missing=f"model.init_from: {file} not found: the pipeline needs a fast tokenizer's tokenizer.json "
                         "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes one)")
    tok = read_tokenizer(file, "model.init_from needs a transformers fast tokenizer's tokenizer.json")
    if ChatTemplate.read(directory) is None:
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
    return tok


def import_chat_template(directory: Path, tok: Tokenizer) -> ChatTemplate | None:
    """DIR's own chat template, probed and with its end-of-turn, document and pad tokens chosen (None when DIR
    has none); one whose replies can't be located is refused, naming its file (chat_template.TemplateError)."""
    template = ChatTemplate.read(directory)
    return None if template is None else template.adopt(tok)
