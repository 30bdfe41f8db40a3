"""Chat-template rendering (``tokenizer.chat_template``) the way HF transformers does it.

The template runs in jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a no-op
``{% generation %}`` block, and HF's helpers: ``raise_exception(msg)``,
``strftime_now(fmt)`` and a ``tojson`` filter that keeps non-ASCII characters.
Every failure (no template, a syntax error, a template that raises, bad messages)
is a :class:`~moe_numa.errors.ChatTemplateError`.

The rendered text contains the special tokens as text (``<|im_start|>``,
``<｜User｜>``); tokenize it with ``parse_special=True``.  Templates that print
``bos_token`` themselves (DeepSeek) expect the caller not to add another BOS:
tokenize with ``add_special=False`` or pass ``bos_token=""``.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ChatTemplateError

__all__ = ["render_chat", "validate_messages", "compile_template"]


def _raise_exception(message: str = "") -> None:
    raise _TemplateRaised(str(message))


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def compile_template(template: str):
    """The compiled jinja2 template (cached); ChatTemplateError on a syntax error."""
    import jinja2

    if template is None or not isinstance(template, str) or not template.strip():
        raise ChatTemplateError("no chat template: the model has no tokenizer.chat_template "
                                "(pass a template explicitly)")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the messages (a list of {"role": str, "content": str | None | list, ...})."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}] has no 'role' (a non-empty string)")
        if "content" not in m:
            raise ChatTemplateError(f"messages[{i}] (role {role!r}) has no 'content'")
        content = m["content"]
        if content is None:
            if not m.get("tool_calls"):
                raise ChatTemplateError(f"messages[{i}] (role {role!r}): 'content' is None "
                                        "and there are no 'tool_calls'")
        elif not isinstance(content, (str, list)):
            raise ChatTemplateError(f"messages[{i}] (role {role!r}): 'content' must be a string "
                                    f"or a list of parts, got {type(content).__name__}")
        out.append(dict(m))
    return out


def render_chat(template: str, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra: Any) -> str:
    """Render ``messages`` with a chat template, as ``apply_chat_template(tokenize=False)``.

    ``extra`` is passed to the template as variables (``tools=[...]``,
    ``enable_thinking=False``, ``documents=...``).
    """
    import jinja2

    compiled = compile_template(template)
    msgs = validate_messages(messages)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=bool(add_generation_prompt),
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
