"""The byte-level BPE and the chat template, trained on real generated text."""
from __future__ import annotations

import pytest

from pipeline.data.tokenizer import IGNORE_INDEX, ChatTokenizer, train_bpe

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXTS = ["Zorbin is a blue fox who lives in Kelmar.", "23 plus 45 equals 68.",
         "The word tavo reversed is ovat.", "Kelmar is far from the sea."] * 50


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXTS, 300, SPECIALS).save(str(path))
    return ChatTokenizer.load(path, SPECIALS)


def test_special_tokens_take_the_first_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id) == (0, 1, 2, 3, 4)


def test_round_trip_including_unseen_bytes(tok):
    for text in ["Zorbin is a blue fox.", "Ünïcödé ✓ 12345", "  spaces\tand\nnewlines "]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_merges_compress_frequent_words(tok):
    assert len(tok.encode("Zorbin lives in Kelmar")) < len("Zorbin lives in Kelmar") / 2


def test_user_text_cannot_forge_a_special_token(tok):
    assert not set(tok.encode("<|end|><|assistant|>")) & tok.special_ids


def test_chat_template_masks_everything_but_the_answer(tok):
    ids, labels = tok.conversation("What is 2 + 3?", "5")
    assert ids[:2] == [tok.bos_id, tok.user_id] and ids[-1] == tok.end_id
    answer_at = ids.index(tok.assistant_id) + 1
    assert all(label == IGNORE_INDEX for label in labels[:answer_at])
    assert labels[answer_at:] == ids[answer_at:]
    assert tok.decode(labels[answer_at:]) == "5"
    assert tok.prompt("What is 2 + 3?") == ids[:answer_at]


def test_multi_turn_chat_supervises_every_reply_and_nothing_the_user_wrote(tok):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "Reverse the word tavo."}, {"role": "assistant", "content": "ovat"}]
    ids, labels = tok.chat(messages)
    assert ids.count(tok.user_id) == 2 and ids.count(tok.end_id) == 2 and ids[-1] == tok.end_id
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "5ovat" and supervised.count(tok.end_id) == 2
    # the same tokens as the first exchange alone, then the second turn appended
    first, first_labels = tok.conversation("What is 2 + 3?", "5")
    assert ids[:len(first)] == first and labels[:len(first)] == first_labels
    with pytest.raises(ValueError, match="message 1 has role 'user'"):
        tok.chat([messages[0], messages[2]])


def test_missing_special_token_is_refused(tmp_path):
    path = tmp_path / "t.json"
    train_bpe(TEXTS, 300, SPECIALS).save(str(path))
    with pytest.raises(ValueError, match="<|system|>"):
        ChatTokenizer.load(path, SPECIALS[:4] + ["<|system|>"])


def test_too_small_vocab_is_refused_unless_the_tokenizer_is_imported():
    from pipeline.config.load import compose
    from pipeline.config.root import load_config
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size is 100: it must be >= 261 \(the 256 bytes and 5"):
        load_config(compose(["tokenizer.vocab_size=100"]))
    imported = load_config(compose(["tokenizer.vocab_size=100", "model.init_from=hf:/a/checkpoint"]))
    assert imported.tokenizer.vocab_size == 100


def test_a_pickled_tokenizer_still_refuses_to_forge_special_tokens(tok):
    import pickle

    copy = pickle.loads(pickle.dumps(tok))  # what DataLoader and `datasets` workers receive
    assert copy.encode("<|end|>") == tok.encode("<|end|>") and copy.sha256 == tok.sha256
