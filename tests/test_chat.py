"""Chat templates: the real Qwen2/Qwen2.5/Qwen3/DeepSeek-V3 templates and render_chat's errors."""
from __future__ import annotations

import pytest

from moe_numa.chat import render_chat
from moe_numa.errors import ChatTemplateError, MoeNumaError
from moe_numa.testing import vocab as V
from moe_numa.tokenizer import GGUFTokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]

QWEN_CHATML = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
DS_BOS = "<｜begin▁of▁sentence｜>"


@pytest.mark.parametrize("template", [V.QWEN2_CHAT_TEMPLATE, V.QWEN25_CHAT_TEMPLATE,
                                      V.QWEN3_CHAT_TEMPLATE])
@pytest.mark.parametrize("agp", [True, False])
def test_qwen_chatml(template, agp):
    out = render_chat(template, CHAT, add_generation_prompt=agp)
    assert out == QWEN_CHATML + ("<|im_start|>assistant\n" if agp else "")


def test_qwen_default_system_prompts():
    user = [{"role": "user", "content": "Hi"}]
    assert render_chat(V.QWEN2_CHAT_TEMPLATE, user) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(V.QWEN25_CHAT_TEMPLATE, user) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(V.QWEN3_CHAT_TEMPLATE, user) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_thinking():
    user = [{"role": "user", "content": "Hi"}]
    assert render_chat(V.QWEN3_CHAT_TEMPLATE, user, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the last assistant turn keeps its reasoning, earlier ones lose it
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"}]
    assert render_chat(V.QWEN3_CHAT_TEMPLATE, msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n")


def test_qwen25_tools_use_tojson_without_ascii_escapes():
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {}}}]
    out = render_chat(V.QWEN25_CHAT_TEMPLATE, [{"role": "user", "content": "x"}], tools=tools)
    assert '{"type": "function", "function": {"name": "météo", "parameters": {}}}' in out
    assert out.startswith("<|im_start|>system\nYou are Qwen")


@pytest.mark.parametrize("agp,tail", [(True, "<｜Assistant｜>"), (False, "")])
def test_deepseek_v3(agp, tail):
    out = render_chat(V.DEEPSEEK_V3_CHAT_TEMPLATE, CHAT, add_generation_prompt=agp,
                      bos_token=DS_BOS, eos_token="<｜end▁of▁sentence｜>")
    assert out == (DS_BOS + "You are terse.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
                   "<｜User｜>2+2?" + tail)


def test_deepseek_v3_tool_round():
    msgs = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get", "arguments": '{"c": 1}'}}]},
            {"role": "tool", "content": "sunny"}]
    out = render_chat(V.DEEPSEEK_V3_CHAT_TEMPLATE, msgs, bos_token=DS_BOS)
    assert out == (DS_BOS + "A\n\nB<｜User｜>weather?<｜Assistant｜><｜tool▁calls▁begin｜>"
                   "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{\"c\": 1}\n```"
                   "<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny"
                   "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_rendered_chat_tokenizes_to_special_ids():
    spec = V.deepseek_v3_vocab(1000)
    tok = GGUFTokenizer.from_metadata(spec.metadata())
    text = render_chat(spec.chat_template, CHAT, bos_token=tok.id_to_token(tok.bos_id))
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.token_to_id("<｜Assistant｜>")
    assert ids.count(tok.token_to_id("<｜User｜>")) == 2
    spec = V.qwen2_vocab(1000)
    tok = GGUFTokenizer.from_metadata(spec.metadata())
    ids = tok.encode(render_chat(spec.chat_template, CHAT), parse_special=True)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5


def test_helpers():
    t = "{{ raise_exception('no system allowed') if messages[0].role == 'system' }}ok"
    with pytest.raises(ChatTemplateError, match="no system allowed"):
        render_chat(t, CHAT)
    assert render_chat(t, CHAT[1:]) == "ok"
    assert len(render_chat("{{ strftime_now('%Y') }}", [])) == 4
    assert render_chat("{{ x | tojson }}", [], x={"k": "é<"}) == '{"k": "é<"}'
    assert render_chat("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                       "{{ m.role }}{% endfor %}", CHAT) == "system"
    assert render_chat("{% generation %}{{ 'x' }}{% endgeneration %}", []) == "x"


def test_trim_and_lstrip_blocks():
    t = "{% for m in messages %}\n  {% if true %}\n{{ m.role }}\n  {% endif %}\n{% endfor %}"
    assert render_chat(t, CHAT[:2]) == "system\nuser\n"


@pytest.mark.parametrize("template", [None, "", "   "])
def test_missing_template(template):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(template, CHAT)


def test_syntax_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        render_chat("ok\n{% if %}", CHAT)


def test_sandbox():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__ }}", CHAT)
    with pytest.raises(ChatTemplateError):   # immutable: no list.append
        render_chat("{% set l = [] %}{{ l.append(1) }}", CHAT)


@pytest.mark.parametrize("messages,match", [
    ("hello", "list of dicts"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "assistant", "content": None}], "no 'tool_calls'"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        render_chat(V.QWEN3_CHAT_TEMPLATE, messages)
    assert isinstance(e.value, MoeNumaError) and isinstance(e.value, ValueError)


def test_template_errors_at_render_time():
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat("{{ messages[0].content + 1 }}", CHAT)
