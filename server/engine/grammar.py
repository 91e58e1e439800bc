"""Grammar-constrained decoding with llguidance: grammars compiled once per distinct spec, one matcher per
choice, and the next-token masks of a batch applied to its logits in one vectorised step.

The flow per decode step: every row that has a grammar fills its row of a packed bitmask (32 tokens per
int32 word), the bits are unpacked into a (R, V) boolean tensor
and the forbidden logits of those rows set to -inf before the draw; the drawn token is then consumed by the
row's matcher (`Sequence.append`). Rows without a grammar are not touched. The matcher allows the stop
tokens (EOS) only where the grammar is complete, and reports `is_stopped()` once nothing may follow.

Forced tokens (where the grammar allows exactly one continuation) are not appended without a model step:
the state pool's recurrent state has to see every token anyway, so a forced token still costs one batched
decode row; the mask simply leaves one choice to the draw.

This is the only module that imports llguidance; model/ and the scheduler never see it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
from torch import Tensor

from model.tokenizer import Tokenizer

log = logging.getLogger("aetheris.grammar")

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# Compact JSON (no free whitespace between tokens): a sampled model cannot wander off into blank runs, and the
# output is what json.dumps(separators=(",", ":")) writes.
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 64


class GrammarError(ValueError):
    """The grammar or schema cannot be compiled; the message names the offending feature."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks the output to match: kind (one of KINDS) and its source text (a JSON schema, a
    regex, a JSON list of choices, or a Lark grammar). Hashable, so it keys the compile cache."""

    kind: str
    source: str


@dataclass(frozen=True)
class CompiledGrammar:
    """A validated grammar for one tokenizer; `matcher()` starts a fresh parse for one choice."""

    tokenizer: LLTokenizer
    grammar: str

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(LLMatcher(self.tokenizer, self.grammar, log_level=0), self.tokenizer.vocab_size)


class GrammarMatcher:
    """One choice's position in its grammar."""

    def __init__(self, matcher: LLMatcher, vocab: int) -> None:
        self.m, self.vocab = matcher, vocab  # vocab: the LLTokenizer's, which sizes a bitmask row

    def accepts(self, token_id: int) -> bool:
        """Whether the grammar allows this token next (without consuming it)."""
        return self.m.validate_tokens([token_id]) == 1

    def consume(self, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar rejects it (the matcher is then in error)."""
        ok = self.m.consume_token(token_id)
        if not ok:
            log.warning("grammar rejected token %d: %s", token_id, self.m.get_error())
        return ok

    @property
    def done(self) -> bool:
        """Nothing may follow: the grammar is complete and closed (or broken)."""
        return self.m.is_stopped() or self.m.is_error()


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar (a JSON string) for a spec; malformed input raises GrammarError."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise GrammarError("the schema must be a JSON object")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(lark_literal(c) for c in choices))
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.source)
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def lark_literal(text: str) -> str:
    """A Lark string literal matching `text` exactly (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarCompiler:
    """Builds llguidance's view of the tokenizer once and compiles grammars for it, keeping the last
    CACHE_SIZE distinct ones. Thread-safe: the API compiles off the event loop, in worker threads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = LLTokenizer(
            tokenizer.tokenizer.to_str(),
            n_vocab=tokenizer.vocab_size,
            eos_token=list(tokenizer.stop_token_ids) or None,
        )
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # cache misses, for tests and logs

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        grammar = grammar_text(spec)
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(error)
        out = CompiledGrammar(self.tokenizer, grammar)
        with self._lock:
            self.compiled += 1
            self._cache[spec] = out
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return out


# ---------------------------------------------------------------- masks over a batch


def fill_bitmask(matchers: list[GrammarMatcher]) -> Tensor:
    """(R, ceil(V/32)) int32: row r packs which tokens matchers[r] allows next. Filled row by row in the
    engine thread: llguidance's parallel executor hands each row to a worker thread, which costs more than
    the fill itself on a few busy cores."""
    bitmask = allocate_token_bitmask(len(matchers), matchers[0].vocab)  # a server's matchers share one tokenizer
    for r, g in enumerate(matchers):
        fill_next_token_bitmask(g.m, bitmask, r)
    return bitmask


_SHIFTS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: Tensor, vocab: int) -> Tensor:
    """Unpack a (R, W) int32 bitmask into a (R, vocab) bool tensor: token t is allowed iff bit t & 31 of word
    t >> 5 is set."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # (R, W, 32); >> is arithmetic but only bit 0 is kept
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def allowed_tokens_reference(bitmask: Tensor, vocab: int) -> Tensor:
    """The obvious per-token loop that `allowed_tokens` must equal."""
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for r in range(bitmask.shape[0]):
        for t in range(vocab):
            word = int(bitmask[r, t >> 5]) & 0xFFFFFFFF
            out[r, t] = bool((word >> (t & 31)) & 1)
    return out


def apply_masks(logits: Tensor, rows: list[int], bitmask: Tensor) -> Tensor:
    """logits (B, V) with every token not allowed in bitmask row r set to -inf in logits row rows[r]; a new
    tensor (the runner's logits also feed logprobs and the prefix cache). Other rows are left as they are."""
    allowed = allowed_tokens(bitmask, logits.shape[-1]).to(logits.device)  # (R, V)
    idx = torch.tensor(rows, device=logits.device)
    # where + index_copy_: masked_fill and index_put on gathered rows are an order of magnitude slower on CPU
    masked = torch.where(allowed, logits.index_select(0, idx), torch.tensor(float("-inf"), device=logits.device))
    return logits.clone().index_copy_(0, idx, masked)


def apply_masks_reference(logits: Tensor, rows: list[int], bitmask: Tensor) -> Tensor:
    """Row by row, token by token: what `apply_masks` must equal."""
    out = logits.clone()
    allowed = allowed_tokens_reference(bitmask, logits.shape[-1])
    for r, row in enumerate(rows):
        for t in range(logits.shape[-1]):
            if not allowed[r, t]:
                out[row, t] = float("-inf")
    return out


def constrain(logits: Tensor, grammars: list[GrammarMatcher | None]) -> Tensor:
    """The batch's logits (B, V) with each row's grammar mask applied; the same tensor when no row has one."""
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.done]
    if not rows:
        return logits
    return apply_masks(logits, rows, fill_bitmask([grammars[i] for i in rows]))
