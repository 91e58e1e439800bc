"""llama.cpp through llama-cpp-python's low-level API: batched greedy decode over n_seq_max recurrent cells,
and single-sequence prefill, on a GGUF converted from the same HF weights."""

from __future__ import annotations

import time

import numpy as np


def _no_log(level, text, user_data) -> None:
    pass


try:
    import llama_cpp

    _QUIET = llama_cpp.llama_log_callback(_no_log)  # kept alive here: llama.cpp calls it until the process ends
except ImportError:
    _QUIET = None


class LlamaCpp:
    def __init__(self, gguf: str, n_seq: int, n_batch: int = 2048, threads: int = 2, repack: bool = True) -> None:
        """`repack` False: no extra buffer types (no AMX / repacked weight layouts), so quantized models run on
        the CPUs where its AMX repacking segfaults."""
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_QUIET, None)  # its per-tensor load log would bury the benchmark's own lines
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(gguf.encode(), params)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 16384, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], pos: list[int], seq: list[int], logits: list[bool]) -> None:
        L = self.L
        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, (t, p, s, w) in enumerate(zip(tokens, pos, seq, logits)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, int(w)
                batch.seq_id[i][0] = s
            batch.n_tokens = len(tokens)
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            L.llama_batch_free(batch)

    def argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())


def decode_tokens_per_s(
    gguf: str, batch: int, new_tokens: int = 128, prompt_len: int = 16, repack: bool = True
) -> float:
    lc = LlamaCpp(gguf, n_seq=batch, repack=repack)
    try:
        toks, pos, seq, want = [], [], [], []
        for s in range(batch):
            for j in range(prompt_len):
                toks.append((7 * s + j) % 1000)
                pos.append(j)
                seq.append(s)
                want.append(j == prompt_len - 1)
        lc.decode(toks, pos, seq, want)
        last = [lc.argmax(prompt_len * (s + 1) - 1) for s in range(batch)]
        t0 = time.perf_counter()
        for step in range(new_tokens):
            lc.decode(last, [prompt_len + step] * batch, list(range(batch)), [True] * batch)
            last = [lc.argmax(i) for i in range(batch)]
        return batch * new_tokens / (time.perf_counter() - t0)
    finally:
        lc.close()


def prefill_tokens_per_s(gguf: str, length: int, repack: bool = True) -> float:
    lc = LlamaCpp(gguf, n_seq=1, n_batch=max(512, length), repack=repack)
    try:
        toks = [(13 * j) % 1000 for j in range(length)]
        lc.decode(toks, list(range(length)), [0] * length, [False] * (length - 1) + [True])  # warm, as the others
        lc.clear()
        t = time.perf_counter()
        lc.decode(toks, list(range(length)), [0] * length, [False] * (length - 1) + [True])
        return length / (time.perf_counter() - t)
    finally:
        lc.close()
