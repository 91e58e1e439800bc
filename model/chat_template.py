"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

A checkpoint's template is Jinja written against transformers' renderer, and small differences change the
prompt: Jinja's own `tojson` HTML-escapes and sorts keys (transformers' does neither), and without
`trim_blocks` / `lstrip_blocks` every block tag leaves its newline behind. This is a pinned copy of that
renderer's behaviour, matching transformers 5.23.0 (utils/chat_template_utils.py, `_compile_jinja_template`
and `render_jinja_template`; tokenization_utils_base.py, `apply_chat_template`):

- environment: sandboxed and immutable, `trim_blocks`, `lstrip_blocks`, the loop controls (`break`,
  `continue`) and the `{% generation %}` block tag (rendered as its body: assistant masks are not computed);
- `tojson`: plain `json.dumps`, keys in order, `ensure_ascii=False`, optional indent / separators / sort_keys;
- globals: `raise_exception` (its message reaches the client as a 400), `strftime_now` (local time), a
  restricted `dict`, and a `namespace` that refuses underscore-prefixed names;
- variables: `messages` (top-level keys whose value is None dropped; `reasoning_content` and `thinking` filled
  from each other), `tools` and `documents` (None when absent), `add_generation_prompt`, the named special
  tokens the tokenizer sets (bos, eos, unk, sep, pad, cls, mask), then the request's `chat_template_kwargs`.
The rendered text is tokenized without adding special tokens (the template writes them).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")  # what chat_template_kwargs cannot set
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render them; the message says which."""


def tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)`, without the attributes of the real type."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed names (they lead to the interpreter's internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed names ({name!r})")


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): its body, as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template in transformers' environment; a syntax error raises ChatTemplateError naming its line."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from e


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: top-level None values dropped, reasoning aliased."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    source: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text. A template that raises (raise_exception) or fails to render raises ChatTemplateError."""
    template = compile_template(source)
    extra = {**(special_tokens or {}), **(template_kwargs or {})}  # request kwargs override special tokens
    try:
        return template.render(
            messages=template_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=bool(add_generation_prompt),
            **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:  # raise_exception: the template's own words
            raise ChatTemplateError(f"the chat template refused these messages: {e.message}") from e
        raise ChatTemplateError(f"the chat template failed to render ({type(e).__name__}: {e.message})") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template failed to render ({type(e).__name__}: {e})") from e
