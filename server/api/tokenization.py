"""POST /tokenize and POST /detokenize (vLLM's extension endpoints): text or chat messages <-> token ids."""

from __future__ import annotations

from .errors import APIError
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving import Serving


def tokenize(serving: Serving, body: TokenizeRequest) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
    if body.messages is not None:
        ids = serving.tokenizer.encode_chat([m.to_template() for m in body.messages], body.add_generation_prompt)
    else:
        ids = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=serving.max_model_len)


def detokenize(serving: Serving, body: DetokenizeRequest) -> DetokenizeResponse:
    serving.check_tokens(body.tokens, "tokens")
    return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens, skip_special_tokens=False))
