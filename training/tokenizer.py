"""Train a byte-level BPE tokenizer with `tokenizers` when a run does not bring one."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: every byte is a token, so any text encodes) with our special tokens.

    `<|endoftext|>` (id 0) separates documents and ends generations; the role tokens and `<|end|>` frame
    chat turns as DEFAULT_CHAT_TEMPLATE writes them.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "add_bos_token": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    return Tokenizer(tok, config)
