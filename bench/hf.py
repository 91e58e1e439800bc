"""transformers on the same weights (MambaForCausalLM, or any family through AutoModelForCausalLM): greedy
generate and the prefill forward."""

from __future__ import annotations

import time

import torch


def load(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, new_tokens: int = 128, prompt_len: int = 16) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=model.device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    total = time.perf_counter() - t
    return batch * (new_tokens - 1) / max(1e-9, total - prefill)


@torch.inference_mode()
def prefill_tokens_per_s(model, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    model(ids, use_cache=True)  # warm at the measured length, as the other systems are
    t = time.perf_counter()
    model(ids, use_cache=True).logits[0, -1].cpu()  # waits for the device to finish (CUDA runs asynchronously)
    return length / (time.perf_counter() - t)
