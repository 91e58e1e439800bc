"""Training data: text / JSONL files -> documents -> tokens -> packed fixed-length sequences.

Documents are tokenised, each followed by <|endoftext|>, concatenated in a seeded random order and cut
into sequences of seq_len + 1 tokens (inputs = the first seq_len, targets = the last seq_len; consecutive
sequences overlap by one token so no target is lost). The token streams are cached on disk, keyed by a hash
of the input files, the data settings and the tokenizer, so a rerun does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

from .config import ConfigError, TrainConfig
from .tokenizer import EOT, train_tokenizer

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


def list_files(paths: list[str], what: str) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{what}: {p} does not exist")
    if not files:
        raise ConfigError(f"{what}: no .txt or .jsonl files in {paths}")
    return files


def read_documents(files: list[Path], separator: str, text_field: str) -> list[str]:
    docs: list[str] = []
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{f}:{n}: not a JSON object with a {text_field!r} string ({e})") from e
                if not isinstance(text, str):
                    raise ConfigError(f"{f}:{n}: {text_field!r} is {type(text).__name__}, not a string")
                docs.append(text)
        else:
            docs += re.split(separator, f.read_text(encoding="utf-8"))
    return [d.strip() for d in docs if d.strip()]


_PROMPTS = [
    "Tell me a story.",
    "Tell me a story about {name}.",
    "Can you tell me a story about {name}?",
    "Write a short story for a child.",
    "Tell me a bedtime story about a {thing}.",
    "Please tell me a story about a {thing}.",
]


def as_chat(story: str, rng: random.Random, tokenizer: Tokenizer) -> str:
    """Wrap a story as a chat turn: the user asks for a story (naming a character when one is found),
    the assistant tells it. Teaches the model the chat template on story data."""
    name = re.search(r"\bnamed ([A-Z][a-z]+)", story)
    thing = re.search(r"\b(?:a|an) (?:little |big |small )?([a-z]{3,})\b", story)
    options = [p for p in _PROMPTS if ("{name}" not in p or name) and ("{thing}" not in p or thing)]
    prompt = rng.choice(options).format(name=name[1] if name else "", thing=thing[1] if thing else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": story}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def pack(docs: list[list[int]], eot: int) -> Tensor:
    """Concatenate documents, each followed by EOT, into one int32 stream."""
    stream = [t for d in docs for t in (*d, eot)]
    return torch.tensor(stream, dtype=torch.int32)


@dataclass
class PackedData:
    tokenizer: Tokenizer
    train: Tensor  # (n,) int32 token stream
    eval: Tensor  # (m,) int32 token stream
    seq_len: int

    def n_sequences(self, split: str = "train") -> int:
        stream = self.train if split == "train" else self.eval
        return max(0, (stream.numel() - 1) // self.seq_len)

    def sequences(self, idx: Tensor, split: str = "train") -> tuple[Tensor, Tensor]:
        """Sequences `idx` -> inputs (B, seq_len), targets (B, seq_len), int64."""
        stream = self.train if split == "train" else self.eval
        starts = idx.long() * self.seq_len  # (B,)
        offsets = torch.arange(self.seq_len + 1)  # (L+1,)
        seqs = stream[starts[:, None] + offsets].long()  # (B, L+1)
        return seqs[:, :-1], seqs[:, 1:]


def _cache_key(cfg: TrainConfig, files: list[Path], tokenizer_hash: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    d = cfg.data
    settings = [
        d.eval_fraction,
        d.separator,
        d.text_field,
        d.chat_fraction,
        d.max_documents,
        cfg.seed,
        cfg.tokenizer.vocab_size,
        tokenizer_hash,
        DEFAULT_CHAT_TEMPLATE,
    ]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


def _tokenizer_hash(path: str | None) -> str:
    if path is None:
        return "trained"
    files = [Path(path) / name for name in ("tokenizer.json", "tokenizer_config.json")]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()


def prepare_data(cfg: TrainConfig, log=print) -> PackedData:
    """Read, split, (train a tokenizer,) tokenise and pack; cached under data.cache_dir."""
    d = cfg.data
    train_files = list_files(d.train, "data.train")
    eval_files = list_files(d.eval, "data.eval") if d.eval else []
    key = _cache_key(cfg, train_files + eval_files, _tokenizer_hash(cfg.tokenizer.path))
    cache = Path(d.cache_dir) / key
    if (cache / "tokens.safetensors").exists():
        t = load_file(cache / "tokens.safetensors")
        log(f"data: cached tokens from {cache}")
        return PackedData(Tokenizer.from_dir(cache), t["train"], t["eval"], d.seq_len)

    rng = random.Random(cfg.seed)
    docs = read_documents(train_files, d.separator, d.text_field)
    rng.shuffle(docs)
    if d.max_documents:
        docs = docs[: d.max_documents]
    if eval_files:
        eval_docs = read_documents(eval_files, d.separator, d.text_field)
    else:
        n_eval = max(1, int(len(docs) * d.eval_fraction))
        docs, eval_docs = docs[n_eval:], docs[:n_eval]
    if cfg.tokenizer.path:
        tokenizer = Tokenizer.from_dir(cfg.tokenizer.path)
        if tokenizer is None:
            raise ConfigError(f"tokenizer.path: no tokenizer.json in {cfg.tokenizer.path}")
    else:
        log(f"data: training a {cfg.tokenizer.vocab_size}-token byte-level BPE on {len(docs)} documents")
        tokenizer = train_tokenizer(docs, cfg.tokenizer.vocab_size)
    eot = tokenizer.token_to_id(EOT) if tokenizer.token_to_id(EOT) is not None else tokenizer.eos_token_id
    if eot is None:
        raise ConfigError("tokenizer: no <|endoftext|> or eos token to separate documents")
    chat = [rng.random() < d.chat_fraction for _ in docs]
    texts = [as_chat(doc, rng, tokenizer) if c else doc for doc, c in zip(docs, chat)]
    encode = lambda xs: [e.ids for e in tokenizer.tokenizer.encode_batch(xs, add_special_tokens=False)]  # noqa: E731
    train, evals = pack(encode(texts), eot), pack(encode(eval_docs), eot)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cache)
    save_file({"train": train, "eval": evals}, cache / "tokens.safetensors")
    log(
        f"data: {len(docs)} train documents ({sum(chat)} as chat), {train.numel()} tokens; "
        f"{len(eval_docs)} eval documents, {evals.numel()} tokens; cached in {cache}"
    )
    return PackedData(tokenizer, train, evals, d.seq_len)
