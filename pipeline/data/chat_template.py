"""A pretrained model's own chat template: read from its checkpoint, rendered as transformers renders it, and
its assistant replies found in what it renders (`pipeline.data.tokenizer.TemplateTokenizer` builds on it).

Design choices:
- The template is the checkpoint's Jinja text, rendered the way transformers renders it (a sandboxed,
  immutable environment with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a JSON
  `tojson`, the bos/eos/pad tokens as variables, `add_generation_prompt`), so the ids match
  `apply_chat_template` without importing transformers.
- A reply is found by rendering, never by parsing the template: with the conversation before reply i
  rendered with `add_generation_prompt=True` as P and the conversation through reply i as Q, P must be a
  prefix of Q (and Q of the whole conversation), the reply's text must follow P, and the end-of-turn token
  must follow the reply. The label span is the reply plus that token, which is also the generation stop.
- A template is probed with a two-exchange conversation before any work (`ChatTemplate.adopt`, the
  `tokenizer` stage's check): one whose replies can't be found this way is refused, naming its file.
- Message text can't forge a control token (the approach of transformers' `sanitize_control_tokens`):
  control tokens in message strings are wrapped in private-use markers before rendering, and the marked
  ones are later encoded as plain text. Text without any control token renders and encodes exactly as
  transformers does; text with one differs from a plain `apply_chat_template` precisely there.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.paths import CHAT_TEMPLATE_FILE, CHAT_TOKENS_FILE

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# transformers >= 4.43 writes the template to chat_template.jinja; so does the tokenizer stage, with chat_tokens.json:
# the special tokens the template and the pipeline use
TEMPLATE_FILE, TOKENS_FILE = CHAT_TEMPLATE_FILE.name, CHAT_TOKENS_FILE.name
CONFIG_FILE = "tokenizer_config.json"
# transformers' private-use markers around a control token that came from message text
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# the conversation a template is probed with: two exchanges, in words no template spells
PROBE = [{"role": "user", "content": "Zq7 first probe question"},
         {"role": "assistant", "content": "Zq7 first probe reply"},
         {"role": "user", "content": "Zq7 second probe question"},
         {"role": "assistant", "content": "Zq7 second probe reply"}]
SAVED = ("bos_token", "eos_token", "pad_token", "end_of_turn", "document", "pad")


class TemplateError(ValueError):
    """A chat template the pipeline can't use, or a conversation it can't render; the message names the file."""


@lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The jinja2 Template for `source`, in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def _token(value: Any, where: Path, field: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TemplateError(f"{where}: {field} is {value!r}, not a token string")
    return value or None


def mark(value: Any, controls: re.Pattern) -> Any:
    """`value` (a message, or any structure of them) with every control token in its strings wrapped in markers;
    markers already there are dropped first, so they can't forge a marked token either."""
    if isinstance(value, str):
        return controls.sub(lambda m: MARK_START + m.group(0) + MARK_END,
                            value.replace(MARK_START, "").replace(MARK_END, ""))
    if isinstance(value, dict):
        return {k: mark(v, controls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark(v, controls) for v in value]
    return value


@dataclass(frozen=True)
class Reply:
    """Where one assistant reply lies in a rendered conversation (character offsets)."""

    start: int
    content_end: int
    end: int  # past the end-of-turn token


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template and the special tokens around it.

    `bos_token`, `eos_token` and `pad_token` are the checkpoint's own (tokenizer_config.json), what the
    template sees; `end_of_turn` (found by probing), `document` (opens each pretraining document) and `pad`
    are what the pipeline uses."""

    source: str
    where: str  # the file the template was read from, for messages
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    end_of_turn: str = ""
    document: str = ""
    pad: str = ""

    # ------------------------------------------------------------------ reading, writing

    @classmethod
    def read(cls, directory: Path) -> ChatTemplate | None:
        """DIR's chat template (chat_template.jinja, else tokenizer_config.json's `chat_template`; of a list of
        named templates, "default"), or None when it has none. Not yet probed: see `adopt`."""
        config_file, jinja_file = directory / CONFIG_FILE, directory / TEMPLATE_FILE
        config: dict = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as err:
                raise TemplateError(f"{config_file} is not valid JSON ({err})") from None
        tokens = {f: _token(config.get(f), config_file, f) for f in ("bos_token", "eos_token", "pad_token")}
        if jinja_file.is_file():
            source, where = jinja_file.read_text(), jinja_file
        else:
            source, where = config.get("chat_template"), config_file
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                if "default" not in named:
                    raise TemplateError(f"{config_file}: chat_template lists the templates {sorted(map(str, named))} "
                                        "but none named 'default', the one a conversation is rendered with")
                source = named["default"]
            if source is None:
                return None
            if not isinstance(source, str):
                raise TemplateError(f"{config_file}: chat_template is a {type(source).__name__}, not a Jinja string "
                                    "or a list of {name, template}")
        if not source.strip():
            raise TemplateError(f"{where}: the chat template is empty")
        return cls(source, str(where), **tokens)

    def save(self, directory: Path) -> None:
        (directory / TEMPLATE_FILE).write_text(self.source)
        (directory / TOKENS_FILE).write_text(json.dumps({f: getattr(self, f) for f in SAVED}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ChatTemplate:
        """What the tokenizer stage wrote into `directory` (artifacts/tokenizer)."""
        file = directory / TOKENS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found beside {directory / TEMPLATE_FILE}: rerun `dvc repro tokenizer`")
        tokens = json.loads(file.read_text())
        return cls((directory / TEMPLATE_FILE).read_text(), str(directory / TEMPLATE_FILE), **tokens)

    # ------------------------------------------------------------------ rendering

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as the template writes it (messages already marked, see `mark`)."""
        variables = {f: getattr(self, f) for f in ("bos_token", "eos_token", "pad_token") if getattr(self, f)}
        try:
            return compile_template(self.source).render(messages=messages, tools=None, documents=None,
                                                        add_generation_prompt=add_generation_prompt, **variables)
        except Exception as err:  # jinja2's TemplateError, or a template's own mistake (an undefined attribute...)
            raise TemplateError(f"{self.where}: the chat template failed to render a conversation of roles "
                                f"{[m.get('role') for m in messages]}: {type(err).__name__}: {err}") from None

    def replies(self, messages: list[dict], end: re.Pattern | None = None) -> tuple[str, list[Reply], list[str]]:
        """(the rendered conversation, where each assistant reply lies in it, the end token after each reply).

        `end` matches the end-of-turn token (default: this template's)."""
        end = end or re.compile(re.escape(self.end_of_turn))
        full = self.render(messages, False)
        replies, ends = [], []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            say = f"{self.where}: assistant message {i} (of {len(messages)})"
            if i == 0:
                raise TemplateError(f"{say} opens the conversation: a reply needs a user turn before it")
            before = self.render(messages[:i], True)
            upto = full if i == len(messages) - 1 else self.render(messages[:i + 1], False)
            if not upto.startswith(before):
                raise TemplateError(f"{say}: the conversation before it, rendered with add_generation_prompt=True, "
                                    "is not a prefix of the conversation through it, so the reply can't be located")
            if not full.startswith(upto):
                raise TemplateError(f"{say}: the conversation through it renders differently once later turns "
                                    "follow (the template rewrites earlier turns), so the replies can't be located")
            content = message.get("content")
            if not isinstance(content, str):
                raise TemplateError(f"{say}: its content is not a string")
            rest = upto[len(before):]
            text = next((c for c in (content, content.strip()) if rest.startswith(c)), None)  # some templates trim
            if text is None:
                raise TemplateError(f"{say}: the reply's text does not follow the generation prompt (the template "
                                    f"renders {rest[:80]!r} there): the template drops, moves or rewrites it")
            after = len(before) + len(text)
            found = re.compile(r"\s*(?:" + end.pattern + ")").match(upto, after)
            if found is None:
                raise TemplateError(f"{say}: no end-of-turn token follows the reply (the template writes "
                                    f"{upto[after:after + 40]!r} after it): the model could not learn when to stop")
            replies.append(Reply(len(before), after, found.end()))
            ends.append(found.group(0).strip())
        return full, replies, ends

    def adopt(self, tok: Tokenizer) -> ChatTemplate:
        """This template probed on a two-exchange conversation, with `end_of_turn`, `document` and `pad` chosen;
        refuses (TemplateError, naming the file) one whose replies can't be located in what it renders."""
        for field in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, field)
            if token is not None and tok.token_to_id(token) is None:
                raise TemplateError(f"{self.where}: {field} {token!r} is not a token of the tokenizer beside it "
                                    f"({Path(self.where).parent / 'tokenizer.json'})")
        try:
            compile_template(self.source)
        except Exception as err:  # jinja2's TemplateSyntaxError, with the line
            raise TemplateError(f"{self.where}: the chat template is not valid Jinja: {err}") from None
        controls = control_tokens(tok, self.source)
        if not controls:
            raise TemplateError(f"{self.where}: the tokenizer has no special tokens, so no end-of-turn token can "
                                "end a reply")
        try:
            _, _, ends = self.replies(PROBE, control_pattern(controls))
        except TemplateError as err:
            raise TemplateError(f"{err} (probing the template with a conversation of two user/assistant "
                                "exchanges)") from None
        if len(set(ends)) != 1:
            raise TemplateError(f"{self.where}: the replies of one conversation end with different tokens {ends}")
        end = ends[0]
        # the document separator: bos, else a token that does not also mean "stop replying"
        document = next(t for t in (self.bos_token, self.eos_token if self.eos_token != end else None,
                                    self.pad_token if self.pad_token != end else None, end) if t)
        return replace(self, end_of_turn=end, document=document, pad=self.pad_token or self.eos_token or end)


def control_tokens(tok: Tokenizer, source: str) -> list[str]:
    """The tokens a chat template controls the conversation with: the tokenizer's special tokens, and its other
    added tokens that the template's text spells (whitespace tokens aside)."""
    return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items())
            if t.special or (t.content in source and not t.content.isspace())]


def control_pattern(tokens: list[str]) -> re.Pattern:
    """A regex matching any of `tokens`, longest first (a token wins over the tokens it contains)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
