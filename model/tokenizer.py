"""Tokenizer: a `tokenizers` tokenizer.json plus the special tokens and chat template of tokenizer_config.json.

Encoding follows the checkpoint's files exactly: special tokens (BOS) are added only by the tokenizer.json
post-processor, or when tokenizer_config.json sets add_bos_token. Decoding for streaming goes through
`IncrementalDetokenizer`, which never emits half a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .chat_template import SPECIAL_TOKENS, compile_template, render

# Used when a checkpoint has no chat template: each turn is "<|role|>\n{content}<|end|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _token_str(value) -> str | None:
    """tokenizer_config values are a string or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _model_eos_ids(directory: Path) -> set[int]:
    """Every eos_token_id of a Hugging Face checkpoint's config.json and generation_config.json (an int or, in
    many chat models, a list: end of text and end of turn). Our own checkpoints keep their stops in
    tokenizer_config.json; their config.json's eos_token_id is a model default, not read here."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = directory / name
        cfg = json.loads(file.read_text()) if file.exists() else {}
        eos = None if cfg.get("model_type") == "aetheris" else cfg.get("eos_token_id")
        ids.update(i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))
    return ids


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, stop_ids: set[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_templates = _named_templates(self.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE)
        for source in self.chat_templates.values():
            compile_template(source)  # a template that does not parse fails the load, naming its line
        self.chat_template = self.chat_templates.get("default") or next(iter(self.chat_templates.values()))
        # What transformers passes a template besides the messages: the named special tokens the tokenizer sets.
        self.special_tokens = {k: v for k in SPECIAL_TOKENS if (v := _token_str(self.config.get(k))) is not None}
        # Tokens that end a generation: EOS and the end-of-turn marker of the chat template, if known.
        # The role markers stop too: a model that skips <|end|> must not write the next turn itself.
        stops = [self.eos_token, "<|end|>", "<|user|>", "<|system|>", *self.config.get("stop_tokens", [])]
        self.stop_token_ids = sorted({i for t in stops if (i := self.token_to_id(t)) is not None} | set(stop_ids))
        self._byte_level = _is_byte_level(self.tokenizer)
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.added_ids = {t.content: i for i, t in added.items()}
        # Control tokens belong to the chat template: what a user types is encoded by a copy that reads
        # "<|end|>" or "<tool_call>" as plain text, never as the token.
        self.control_texts = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        self._plain = HFTokenizer.from_str(self.tokenizer.to_str())
        self._plain.encode_special_tokens = True

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer | None:
        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            return None
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        if files := _template_files(directory):  # as in transformers, they take priority over the config's
            named = [{"name": name, "template": source} for name, source in files.items()]
            config["chat_template"] = files["default"] if list(files) == ["default"] else named
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), config, _model_eos_ids(directory))

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    def added_token_id(self, text: str) -> int | None:
        """The id of the added token (special or not) whose text is exactly `text`, else None."""
        return self.added_ids.get(text)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (a byte-level BPE token may be part of a UTF-8 character)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self.special_ids and all(c in _BYTE_OF for c in piece) and self._byte_level:
            return bytes(_BYTE_OF[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> str:
        """The text of `ids`; with skip_special_tokens, special tokens are left out except those in `keep`
        (the tool-call tags a parser reads, where they are special tokens)."""
        if keep and skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids or i in keep]
            skip_special_tokens = False
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def template_for(self, tools: list[dict] | None) -> str:
        """transformers' choice among named templates: `tool_use` when tools are given and it exists."""
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text, as transformers' apply_chat_template renders it (model/chat_template.py); a template
        that refuses the messages or fails raises ChatTemplateError."""
        return render(
            self.template_for(tools),
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            template_kwargs=template_kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """Render the template, then encode it without adding special tokens again (the template has them).

        A message that spells a control token ("<|end|>", "<tool_call>") is encoded as plain text: it is
        rendered as a unique placeholder, found in the output, and its text encoded by a copy of the tokenizer
        that reads control tokens as text, so a user cannot end a turn and forge another. A template that
        drops or rewrites such a placeholder is refused (ValueError)."""
        typed = {
            i: m["content"]
            for i, m in enumerate(messages)
            if isinstance(m.get("content"), str) and any(c in m["content"] for c in self.control_texts)
        }
        context = dict(tools=tools, documents=documents, template_kwargs=template_kwargs)
        if not typed:
            text = self.apply_chat_template(messages, add_generation_prompt, **context)
            return self.encode(text, add_special_tokens=False)
        marks = {i: f"\ue000{i}\ue001" for i in typed}
        rendered = [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
        text = self.apply_chat_template(rendered, add_generation_prompt, **context)
        where = {i: text.find(mark) for i, mark in marks.items()}
        if min(where.values()) < 0:
            raise ValueError("a message contains control-token text that the chat template rewrites")
        ids, pos = [], 0
        for i in sorted(typed, key=where.get):
            ids += self.encode(text[pos : where[i]], add_special_tokens=False)
            ids += self._plain.encode(typed[i], add_special_tokens=False).ids
            pos = where[i] + len(marks[i])
        return ids + self.encode(text[pos:], add_special_tokens=False)


def _named_templates(value: str | list) -> dict[str, str]:
    """tokenizer_config's chat_template (one string, or [{"name", "template"}, ...]) as {name: source}."""
    if isinstance(value, str):
        return {"default": value}
    return {t["name"]: t["template"] for t in value}


def _template_files(directory: Path) -> dict[str, str]:
    """chat_template.jinja (the default) and chat_templates/<name>.jinja, which transformers writes beside a
    checkpoint's tokenizer."""
    found = {}
    if (directory / "chat_template.jinja").exists():
        found["default"] = (directory / "chat_template.jinja").read_text()
    for file in sorted((directory / "chat_templates").glob("*.jinja")):
        found[file.stem] = file.read_text()
    return found


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _gpt2_byte_map()


def _is_byte_level(tok: HFTokenizer) -> bool:
    import json as _json

    decoder = _json.loads(tok.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, UTF-8 safe.

    The text of the tokens since `prefix` is decoded again at each step (a few tokens of context keep
    SentencePiece's leading-space handling right); new text is emitted only once it no longer ends in the
    replacement character, i.e. once a multi-byte character is complete (the vLLM / TGI scheme).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip, self.keep = skip_special_tokens, keep  # keep: special tokens whose text is not skipped
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip, self.keep)
        full_text = self.tokenizer.decode(self.ids[self.prefix :], self.skip, self.keep)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is left at the end of a generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip, self.keep)
        full_text = self.tokenizer.decode(self.ids[self.prefix :], self.skip, self.keep)
        self.prefix = self.read = len(self.ids)
        return full_text[len(prefix_text) :]
