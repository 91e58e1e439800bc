"""POST /tokenize and POST /detokenize (vLLM's extension endpoints): text or chat messages <-> token ids.

A chat is rendered exactly as a chat completion's prompt is (tools, documents and chat_template_kwargs
included), so a client can see the prompt the model gets."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from .errors import APIError
from .prompts import ChatPrompt, render_chat
from .protocol import ChatMessage, ChatTemplateFields, OpenAIModel
from .serving import Serving


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = None  # None: a pure SSM model has no context limit


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(serving: Serving, body: TokenizeRequest) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
    if body.messages is not None:
        chat = ChatPrompt.of(serving.tokenizer, body.messages, body)
        ids, _ = await render_chat(
            serving.tokenizer, chat, boundaries=False, add_generation_prompt=body.add_generation_prompt
        )
    else:
        ids = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=serving.max_model_len)


def detokenize(serving: Serving, body: DetokenizeRequest) -> DetokenizeResponse:
    serving.check_tokens(body.tokens, "tokens")
    return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens, skip_special_tokens=False))
