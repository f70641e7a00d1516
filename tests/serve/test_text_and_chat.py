"""A model folder with a tokenizer: text prompts, streamed text, and chat completions through
its chat template. The tokenizer is a word-level one made here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.runtime.llm import LLMEngine
from engine.runtime.serve import ServeOptions, ServerThread
from tests.serve.conftest import ENGINE, call

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def model_folder(path: Path) -> Path:
    entry = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny_qwen3.yaml"
    hf = {k: v for k, v in yaml.safe_load(entry.read_text())["hf_config"].items()
          if k != "rope_scaling"}
    (path / "config.json").write_text(json.dumps(hf))
    vocab = {"[UNK]": 0, "<eos>": 1, ":": 2} | {f"w{i}": i + 3 for i in range(509)}
    vocab |= {"user": 400, "assistant": 401, "hello": 402, "there": 403}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                        eos_token="<eos>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("tiny"))
    engine = LLMEngine(str(folder), **ENGINE)
    with ServerThread(engine, ServeOptions(port=0), model=str(folder)) as running:
        yield running


def test_text_prompt_and_streamed_text(text_server) -> None:
    status, body = call(text_server.url, "/v1/completions",
                        {"prompt": "hello there w7", "max_tokens": 6, "ignore_eos": True,
                         "return_token_ids": True})
    assert status == 200 and body["usage"]["prompt_tokens"] == 3
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == 6
    assert choice["text"].split() == [w for w in choice["text"].split() if w]
    assert len(choice["text"].split()) == sum(t not in (0, 1) for t in choice["token_ids"])


def test_chat_completion_through_the_template(text_server) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    status, body = call(text_server.url, "/v1/chat/completions",
                        {"messages": messages, "max_completion_tokens": 4, "ignore_eos": True})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == 6  # user : hello there assistant :
    assert body["choices"][0]["message"]["role"] == "assistant"
    status, text = call(text_server.url, "/v1/chat/completions",
                        {"messages": messages, "max_tokens": 3, "ignore_eos": True,
                         "stream": True})
    chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert status == 200 and len(chunks) == 3 and text.endswith("data: [DONE]\n\n")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
