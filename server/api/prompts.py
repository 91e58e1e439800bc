"""The chat template applied to a request: its messages, tools, documents and template variables rendered
into prompt tokens (model/chat_template.py renders as transformers does), and where each earlier message
ends in them, which is where the engine keeps prefix snapshots. Shared by chat completions and /tokenize."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from model.chat_template import ChatTemplateError
from model.tokenizer import Tokenizer

from .errors import APIError
from .protocol import ChatMessage, ChatTemplateFields
from .tools import template_messages


@dataclass
class ChatPrompt:
    messages: list[dict[str, Any]]  # as the template takes them
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer: Tokenizer, messages: list[ChatMessage], body: ChatTemplateFields) -> ChatPrompt:
        tools = body.template_tools()
        msgs, template_tools = template_messages(messages, tools, tokenizer.template_for(tools))
        return cls(msgs, template_tools, body.documents, body.chat_template_kwargs or {})

    def encode(self, tokenizer: Tokenizer, messages=None, add_generation_prompt: bool = True) -> list[int]:
        return tokenizer.encode_chat(
            self.messages if messages is None else messages,
            add_generation_prompt,
            tools=self.tools,
            documents=self.documents,
            template_kwargs=self.kwargs,
        )


def message_boundaries(tokenizer: Tokenizer, chat: ChatPrompt, prompt: list[int]) -> tuple[tuple[int, ...], int]:
    """Where each earlier message ends in the rendered prompt (a later request sharing the history but not the
    last turn resumes there), and how far the leading system messages reach (0: none). A boundary counts only
    where the history's own rendering is a prefix of the prompt's tokens: that is what a snapshot can serve."""
    points, pinned = [], 0
    for k in range(1, len(chat.messages)):
        try:
            ids = chat.encode(tokenizer, chat.messages[:k], add_generation_prompt=False)
        except Exception:  # a template may refuse a partial history (e.g. one that must end with a user turn)
            continue
        if 0 < len(ids) < len(prompt) and prompt[: len(ids)] == ids:
            points.append(len(ids))
            if all(m["role"] == "system" for m in chat.messages[:k]):
                pinned = len(ids)
    return tuple(points), pinned


def _render(tokenizer: Tokenizer, chat: ChatPrompt, boundaries: bool, add_generation_prompt: bool):
    prompt = chat.encode(tokenizer, add_generation_prompt=add_generation_prompt)
    return prompt, (message_boundaries(tokenizer, chat, prompt) if boundaries else ((), 0))


async def render_chat(
    tokenizer: Tokenizer, chat: ChatPrompt, boundaries: bool = True, add_generation_prompt: bool = True
) -> tuple[list[int], tuple[tuple[int, ...], int]]:
    """(prompt tokens, (message boundaries, pinned prefix)), rendered off the event loop (a long history is
    many renders). A template that refuses the messages or fails is a 400 saying so."""
    try:
        return await asyncio.to_thread(_render, tokenizer, chat, boundaries, add_generation_prompt)
    except ChatTemplateError as e:
        raise APIError(400, f"messages: {e}", "messages", "invalid_value") from e
    except ValueError as e:  # control-token text that the template rewrites
        raise APIError(400, f"messages: {e}", "messages", "invalid_value") from e
