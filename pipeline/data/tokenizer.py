"""Byte-level BPE with chat special tokens, and the chat template built on it.

Training uses HF `tokenizers`: digits are split one per token before the byte-level step (as in
LLaMA/nanochat) so arithmetic sees a consistent place-value alphabet instead of arbitrary merges.
The special tokens are added first, so their ids are small and fixed: pad=0, bos=1, user=2,
assistant=3, end=4 for the default list.

The chat template is token-level, never string-level, so user text can't forge a special token:
    <|bos|> <|user|> question <|assistant|> answer <|end|> [<|user|> question <|assistant|> answer <|end|> ...]
SFT puts loss on every `answer <|end|>` only; generation stops at `<|end|>`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config.data import ROLES
from pipeline.io import file_sha256
from pipeline.paths import TOKENIZER_FILE

IGNORE_INDEX = -100


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
    def load(cls, path: str | Path, special_tokens: list[str]) -> ChatTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the `tokenizer` stage first (dvc repro tokenizer)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises a bare Exception for any unreadable file
            raise ValueError(f"{path} is not a readable tokenizer ({err}): rerun `dvc repro tokenizer`") from None
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing} named in tokenizer.special_tokens: rerun "
                             "`dvc repro tokenizer`, or set tokenizer.special_tokens to the tokens it was trained with")
        return cls(tok, list(special_tokens), file_sha256(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

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
        """(input ids, labels) of a conversation of alternating user and assistant messages: labels are
        IGNORE_INDEX except on every assistant reply and its end token (`with_end=False` leaves the last
        reply open)."""
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for i, message in enumerate(messages):
            role = "user" if i % 2 == 0 else "assistant"
            if message["role"] != role:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {role!r}: a conversation "
                                 "alternates user and assistant messages, starting with the user")
            if role == "user":
                part = [self.user_id, *self.encode(message["content"]), self.assistant_id]
                ids += part
                labels += [IGNORE_INDEX] * len(part)
            else:
                part = self.encode(message["content"]) + ([self.end_id] if with_end or i < len(messages) - 1 else [])
                ids += part
                labels += part
        return ids, labels

    def conversation(self, question: str, answer: str, with_end: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) for one exchange; labels are IGNORE_INDEX except on the answer (+ end)."""
        return self.chat([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], with_end)

    def strip_response(self, ids: list[int]) -> list[int]:
        """Cut a generated response at the first end token (exclusive)."""
        return ids[:ids.index(self.end_id)] if self.end_id in ids else ids


def load_tokenizer(special_tokens: Sequence[str], path: str | Path = TOKENIZER_FILE) -> ChatTokenizer:
    """The workspace's tokenizer (artifacts/tokenizer, written by the tokenizer stage) with the chat template."""
    return ChatTokenizer.load(path, list(special_tokens))


def import_tokenizer(directory: Path, special_tokens: Sequence[str]) -> Tokenizer:
    """A transformers checkpoint's tokenizer.json (`model.init_from`), with any of the pipeline's special
    tokens it lacks appended after its vocabulary: its ids are what the imported weights know."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.init_from: {file} not found: the pipeline needs a fast tokenizer's "
                                "tokenizer.json (AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes one)")
    tok = Tokenizer.from_file(str(file))
    missing = [t for t in special_tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok
