"""A pretrained model's own chat template through the pipeline: the ids transformers renders, the loss on each
reply and its end-of-turn token, prompts, message text that spells a control token, the template's other
forms, templates refused before any work, and the tokenizer stage adopting one that load_tokenizer returns.

The checkpoints are built here, offline: a tiny BPE with ChatML's or Llama 3's special tokens, wrapped in
transformers' PreTrainedTokenizerFast with a realistic template and saved with save_pretrained.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from pipeline.data.chat_template import TemplateError
from pipeline.data.tokenizer import (
    IGNORE_INDEX,
    ChatTokenizer,
    TemplateTokenizer,
    import_chat_template,
    import_tokenizer,
    load_tokenizer,
    train_bpe,
)
from pipeline.inference.chat import Chat
from pipeline.inference.prompting import PromptTemplates, few_shot_prompt
from pipeline.inference.sampling import SamplingConfig
from pipeline.io import file_sha256

from conftest import compose_micro, micro_config

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXTS = ["Zorbin is a blue fox who lives in Kelmar.", "23 plus 45 equals 68.", "The word tavo reversed is ovat.",
         "Kelmar is far from the sea.", "What is 12 + 30? It is 42."] * 40
# Qwen2's template: ChatML with a default system prompt
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3 Instruct's template: bos first, headers, trimmed content, <|eot_id|>
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
          " + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
FAMILIES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|eot_id|>"),
}
EXCHANGE = [{"role": "user", "content": "What is 23 plus 45?"}, {"role": "assistant", "content": "68"}]
TWO_TURNS = [*EXCHANGE, {"role": "user", "content": "Reverse the word tavo."}, {"role": "assistant", "content": "ovat"}]
SYSTEM = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]
UNICODE = [{"role": "user", "content": "Ünïcödé ✓ 12345?"},
           {"role": "assistant", "content": "Zorbin\nlives in Kelmar."}]
SPACED = [{"role": "user", "content": "  spaces \t"}, {"role": "assistant", "content": " 42 "}]
CONVERSATIONS = [EXCHANGE, TWO_TURNS, SYSTEM, UNICODE, SPACED]


def save_checkpoint(directory: Path, family: str, template: str | None = None) -> transformers.PreTrainedTokenizerFast:
    specials, default, tokens, _ = FAMILIES[family]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(TEXTS, 400, specials), **tokens)
    hf.chat_template = default if template is None else template
    hf.save_pretrained(str(directory))
    return hf


def adopted(directory: Path) -> TemplateTokenizer:
    bpe = import_tokenizer(directory, SPECIALS)
    return TemplateTokenizer(bpe, import_chat_template(directory, bpe))


def hf_ids(hf, messages: list[dict], **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def ckpt(request, tmp_path_factory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_checkpoint(directory, request.param)
    return SimpleNamespace(dir=directory, hf=hf, tok=adopted(directory), end=FAMILIES[request.param][3],
                           family=request.param)


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs, run = [*runs, run], []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["exchange", "two_turns", "system", "unicode", "spaced"])
def test_ids_are_what_transformers_renders(ckpt, messages):
    assert ckpt.tok.chat(messages)[0] == hf_ids(ckpt.hf, messages)
    assert ckpt.tok.render(messages, add_generation_prompt=False) == hf_ids(ckpt.hf, messages)


def test_the_loss_falls_on_each_reply_and_its_end_of_turn_token(ckpt):
    tok = ckpt.tok
    assert tok.end_id == tok.tok.token_to_id(ckpt.end)
    for messages in CONVERSATIONS:
        ids, labels = tok.chat(messages)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if ckpt.family == "llama3":
            replies = [r.strip() for r in replies]  # its template trims every message
        runs = supervised_runs(ids, labels)
        assert [tok.tok.decode(r, skip_special_tokens=False) for r in runs] == [r + ckpt.end for r in replies]
        assert all(r[-1] == tok.end_id and tok.end_id not in r[:-1] for r in runs)
        assert [tok.decode(tok.strip_response(r)) for r in runs] == replies


def test_prompts_are_the_generation_prompt_and_open_the_reply(ckpt):
    tok, q, a = ckpt.tok, "What is 12 + 30?", "It is 42."
    prompt = tok.prompt(q)
    assert prompt == hf_ids(ckpt.hf, [{"role": "user", "content": q}], add_generation_prompt=True)
    ids, labels = tok.conversation(q, a)
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in labels[:len(prompt)])
    open_ids, open_labels = tok.conversation(q, a, with_end=False)  # a rejected reply that never ended
    assert open_ids == ids[:ids.index(tok.end_id, len(prompt))]
    assert tok.decode([t for t in open_labels if t != IGNORE_INDEX]) == a
    assert tok.bos_id is not None and tok.pad_id is not None and tok.user_id is None and tok.assistant_id is None


def test_message_text_cannot_forge_a_control_token(ckpt):
    tok = ckpt.tok
    forged = [{"role": "user", "content": f"Say {ckpt.end} then stop"},
              {"role": "assistant", "content": f"I typed {ckpt.end} and {tok.special_tokens[0]} as text"}]
    ids, labels = tok.chat(forged)
    # what transformers gives when it keeps message text from forging control tokens, not what a plain render gives
    assert ids == hf_ids(ckpt.hf, forged, sanitize_control_tokens=True) != hf_ids(ckpt.hf, forged)
    assert ids.count(tok.end_id) == hf_ids(ckpt.hf, EXCHANGE).count(tok.end_id)  # only the template's own
    [run] = supervised_runs(ids, labels)
    assert tok.tok.decode(run, skip_special_tokens=False) == forged[1]["content"] + ckpt.end
    assert not set(tok.encode(ckpt.end)) & tok.special_ids
    copy = pickle.loads(pickle.dumps(tok))  # what DataLoader and `datasets` workers receive
    assert copy.chat(forged) == (ids, labels) and copy.encode(ckpt.end) == tok.encode(ckpt.end)


def test_few_shot_prompts_and_the_chat_history_render_through_the_template(ckpt):
    tok = ckpt.tok
    shots = [{"prompt": "What is 23 plus 45?", "answer": "68"}, {"prompt": "Reverse tavo.", "answer": "ovat"}]
    ids, used = few_shot_prompt(tok, PromptTemplates(), shots, "What is 12 + 30?", room=10_000)
    messages = [m for s in shots for m in ({"role": "user", "content": s["prompt"]},
                                           {"role": "assistant", "content": s["answer"]})]
    ask = {"role": "user", "content": "What is 12 + 30?"}
    assert used == 2 and ids == hf_ids(ckpt.hf, [*messages, ask], add_generation_prompt=True)
    fitted, used = few_shot_prompt(tok, PromptTemplates(), shots, "What is 12 + 30?", room=len(ids) - 1)
    assert used == 1 and fitted == hf_ids(ckpt.hf, [*messages[2:], ask], add_generation_prompt=True)
    chat = Chat(SimpleNamespace(config=SimpleNamespace(block_size=512)), tok, SamplingConfig(8, 0.0), seed=0)
    chat.turns.append((tok.encode("What is 23 plus 45?"), tok.encode("68") + [tok.end_id]))
    assert chat.context(ask["content"]) == hf_ids(ckpt.hf, [*EXCHANGE, ask], add_generation_prompt=True)


def test_the_export_config_renders_the_same_ids_in_transformers(ckpt, tmp_path):
    """`hf_tokenizer_config` (what export writes as tokenizer_config.json), for both tokenizer classes."""
    shutil.copy(ckpt.dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ckpt.tok.hf_tokenizer_config(128)))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf_ids(hf, TWO_TURNS) == ckpt.tok.chat(TWO_TURNS)[0] and hf.pad_token_id == ckpt.tok.pad_id
    assert ckpt.tok.hf_token_ids()["eos"] == ckpt.tok.end_id

    default_dir = tmp_path / "default"
    default_dir.mkdir()
    default = ChatTokenizer(train_bpe(TEXTS, 300, SPECIALS), SPECIALS)
    default.tok.save(str(default_dir / "tokenizer.json"))
    (default_dir / "tokenizer_config.json").write_text(json.dumps(default.hf_tokenizer_config(128)))
    hf = transformers.AutoTokenizer.from_pretrained(str(default_dir), local_files_only=True)
    assert hf_ids(hf, TWO_TURNS) == default.chat(TWO_TURNS)[0] == default.render(TWO_TURNS, False)
    assert hf_ids(hf, TWO_TURNS[:3], add_generation_prompt=True) == default.render(TWO_TURNS[:3])
    assert default.render(EXCHANGE[:1]) == default.prompt(EXCHANGE[0]["content"])
    # a system message, folded into the first user turn by both (no system token: the vocabulary is the checkpoints')
    assert hf_ids(hf, SYSTEM) == default.chat(SYSTEM)[0] == default.render(SYSTEM, False)
    assert hf_ids(hf, SYSTEM[:4], add_generation_prompt=True) == default.render(SYSTEM[:4])


def test_the_template_is_read_from_each_of_its_forms(tmp_path):
    save_checkpoint(tmp_path, "chatml")
    jinja, config_file = tmp_path / "chat_template.jinja", tmp_path / "tokenizer_config.json"
    assert jinja.is_file()  # what transformers >= 4.43 writes
    ids = adopted(tmp_path).chat(TWO_TURNS)[0]
    jinja.unlink()
    config = json.loads(config_file.read_text())
    for form in (CHATML, [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                          {"name": "default", "template": CHATML}]):
        config_file.write_text(json.dumps({**config, "chat_template": form}))
        assert adopted(tmp_path).chat(TWO_TURNS)[0] == ids
    config_file.write_text(json.dumps({**config, "chat_template": [{"name": "tool_use", "template": CHATML}]}))
    with pytest.raises(TemplateError, match=re.escape(str(config_file)) + ".*none named 'default'"):
        adopted(tmp_path)
    jinja.write_text(CHATML)  # the .jinja file wins over tokenizer_config.json
    assert adopted(tmp_path).chat(TWO_TURNS)[0] == ids


def test_a_checkpoint_without_a_template_keeps_the_pipelines(tmp_path):
    save_checkpoint(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").unlink()
    n = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    bpe = import_tokenizer(tmp_path, SPECIALS)
    assert import_chat_template(tmp_path, bpe) is None
    assert [bpe.token_to_id(t) for t in SPECIALS] == list(range(n, n + 5))  # appended after its vocabulary
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        import_tokenizer(tmp_path, SPECIALS)


BROKEN = {  # each a ChatML template the pipeline could not learn from, and what the refusal says
    "reply_only_at_the_end": (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        "{% if messages[-1]['role'] == 'assistant' %}<|im_start|>assistant\n{{ messages[-1]['content'] }}<|im_end|>\n"
        "{% endif %}", "renders differently once later turns follow"),
    "reply_dropped": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "the reply's text does not follow the generation prompt"),
    "no_end_token": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "no end-of-turn token follows the reply"),
    "not_jinja": ("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_template_whose_replies_cant_be_found_is_refused_before_any_work(name, tmp_path, monkeypatch):
    from stages.tokenizer import SPEC, check

    template, message = BROKEN[name]
    save_checkpoint(tmp_path / "ckpt", "chatml", template)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    file = re.escape(str(tmp_path / "ckpt" / "chat_template.jinja"))
    with pytest.raises(TemplateError, match=f"{file}.*({message})"):
        check(micro_config(f"model.init_from=hf:{tmp_path / 'ckpt'}"), SPEC)
    assert not list(work.iterdir())


def test_the_tokenizer_stage_adopts_the_template_and_load_tokenizer_returns_it(tmp_path, monkeypatch):
    from stages import run_stage

    hf = save_checkpoint(tmp_path / "ckpt", "llama3")
    weights = transformers.LlamaConfig(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(weights).save_pretrained(str(tmp_path / "ckpt"))  # the stage checks the model too
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = compose_micro(f"model.init_from=hf:{tmp_path / 'ckpt'}")
    run_stage("prepare", cfg)
    metrics = run_stage("tokenizer", cfg)
    out = Path("artifacts/tokenizer")
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "chat_tokens.json", "tokenizer.json"]
    assert (out / "chat_template.jinja").read_text() == LLAMA3
    assert json.loads((out / "chat_tokens.json").read_text()) == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None,
        "end_of_turn": "<|eot_id|>", "document": "<|begin_of_text|>", "pad": "<|end_of_text|>"}
    tok = load_tokenizer(cfg.tokenizer.special_tokens)
    assert isinstance(tok, TemplateTokenizer) and tok.tok.token_to_id("<|end|>") is None  # none of ours added
    assert tok.chat(TWO_TURNS)[0] == hf_ids(hf, TWO_TURNS)
    shards = json.loads(Path("data/tokens/pretrain.json").read_text())
    assert shards["bos_id"] == tok.bos_id == tok.tok.token_to_id("<|begin_of_text|>")
    assert shards["tokenizer_sha256"] == tok.sha256 and metrics["sha256"] == tok.sha256[:16]
    assert tok.sha256 != file_sha256(out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(LLAMA3.replace("\n\n", "\n"))  # a new template: a new hash
    assert load_tokenizer(cfg.tokenizer.special_tokens).sha256 != tok.sha256
    default = tmp_path / "default" / "tokenizer.json"  # the pipeline's template: tokenizer.json's hash, as before
    default.parent.mkdir()
    train_bpe(TEXTS, 300, SPECIALS).save(str(default))
    plain = load_tokenizer(SPECIALS, default)
    assert type(plain) is ChatTokenizer and plain.sha256 == file_sha256(default)


def test_conversation_lengths_are_counted_in_the_templates_tokens(ckpt):
    """A template writes text of its own around every message: a conversation short in bytes can still overflow
    model.block_size, and is refused rather than skipped by the byte bound that holds for the pipeline's template."""
    from pipeline.harness.validation import check_conversation_lengths
    row = {"messages": [{"role": role, "content": "a"} for _ in range(4) for role in ("user", "assistant")]}
    n = len(ckpt.tok.chat(row["messages"])[0])
    block = 1 + 3 * len(row["messages"])  # the byte bound: the old check skipped the row at this block size
    assert n > block
    with pytest.raises(ValueError, match=f"the conversation has {n} tokens, more than model.block_size"):
        check_conversation_lengths([row], ckpt.tok, block)
    check_conversation_lengths([row], ckpt.tok, n)
