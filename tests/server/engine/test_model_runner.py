"""The ModelRunner on its own: its prefill, fork and batched decode give the logits of model.prefill and
model.decode called directly on each sequence alone; finish and release give back what a sequence held; a
snapshot it kept resumes a later prompt exactly. On a Mamba + attention + MoE model, K/V contiguous or paged."""

from __future__ import annotations

import pytest
import torch

from model import HybridLM
from server.engine.core import CoreConfig
from server.engine.model_runner import ModelRunner
from server.engine.scheduler import RequestState
from server.engine.sequence import Sequence
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=[0, 24], ids=["contiguous", "paged"])
def runner(request):
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, "hybrid")).eval()
    cfg = CoreConfig(max_batch_size=4, max_model_len=32, kv_blocks=request.param, kv_block_size=4, cuda_graphs=False)
    return ModelRunner(model, cfg, tok.vocab_size)


def _request(rid: str, prompt: list[int], n: int = 1, max_tokens: int = 6) -> RequestState:
    params = SamplingParams(n=n, max_tokens=max_tokens)
    r = RequestState(GenerationRequest(rid, prompt, params), emit=lambda out: None)
    r.seqs = [Sequence.create(rid, i, params, toy_tokenizer(), set()) for i in range(n)]
    return r


def _alone(model, tokens: list[int]) -> tuple[torch.Tensor, object]:
    """The reference: the logits after `tokens` and the state, one prefill from scratch."""
    logits, state = model.prefill(torch.tensor([tokens]), model.empty_state(1))
    return logits[0], state


def _prompt_through_runner(runner, r, chunks=(4, 9)) -> torch.Tensor:
    runner.begin(r)
    start = r.computed
    for end in chunks:
        if end > start:
            runner.prefill(r, r.req.prompt_ids[start:end])
            start = end
    return runner.start_decoding(r)


@torch.inference_mode()
def test_prefill_fork_and_decode_equal_the_model_called_directly(runner):
    model, V = runner.model, runner.vocab
    r = _request("a", PROMPT, n=3)
    first = _prompt_through_runner(runner, r)  # two chunks: 4 + 5 tokens
    want, state = _alone(model, PROMPT)
    assert first.shape == (3, V) and first.dtype == torch.float32
    torch.testing.assert_close(first, want[:V].expand(3, V), **TOL)
    assert r.computed == len(PROMPT) and r.state is None and [s.slot for s in r.seqs] == [0, 1, 2]
    # Each fork takes its own token: the rows diverge, and each equals its own sequence decoded alone.
    refs = [state] * 3
    for step in range(4):
        toks = [20 + 7 * i + step for i in range(3)]
        for s, t in zip(r.seqs, toks):
            s.output_ids.append(t)
        seqs, logits = runner.decode()
        assert seqs == r.seqs and logits.shape == (3, V)
        for i, t in enumerate(toks):
            want, refs[i] = model.decode(torch.tensor([t]), refs[i])
            torch.testing.assert_close(logits[i], want[0, :V], **TOL)
    assert runner.pool.held == [len(PROMPT) + 4] * 3


@torch.inference_mode()
def test_finish_and_release_free_every_slot_and_block_once(runner):
    pool = runner.pool
    blocks = pool.free_blocks
    a, b = _request("a", PROMPT, n=2), _request("b", PROMPT[:5])
    _prompt_through_runner(runner, a)
    _prompt_through_runner(runner, b, chunks=(5,))
    assert pool.used == 3 and (pool.free_blocks < blocks) == bool(pool.paged)
    runner.release(a.seqs[0])  # row 0 freed: b's row moves into it
    assert pool.used == 2 and a.seqs[0].slot == -1 and b.seqs[0].slot == 0 and runner.running == [b.seqs[0], a.seqs[1]]
    runner.release(a.seqs[0])  # a second release of the same sequence changes nothing
    assert pool.used == 2
    b.seqs[0].output_ids.append(30)
    a.seqs[1].output_ids.append(31)
    _, logits = runner.decode()
    runner.finish(b.seqs[0], PROMPT[:5] + [30], logits[0])
    runner.finish(a.seqs[1], PROMPT + [31], logits[1])
    assert pool.used == 0 and runner.running == [] and pool.free_blocks == blocks
    assert [s.slot for s in a.seqs + b.seqs] == [-1, -1, -1]


@torch.inference_mode()
def test_a_snapshot_kept_by_finish_resumes_a_later_prompt_exactly(runner):
    model, V = runner.model, runner.vocab
    r = _request("a", PROMPT)
    _prompt_through_runner(runner, r)
    seq = r.seqs[0]
    for t in (40, 41, 42):
        seq.output_ids.append(t)
        _, logits = runner.decode()
    # The row now summarises the prompt and the tokens decoded: where the next chat turn resumes.
    runner.finish(seq, PROMPT + [40, 41, 42], logits[0])
    turn = PROMPT + [40, 41, 42, 50, 51]
    nxt = _request("b", turn)
    snap = runner.begin(nxt)
    assert snap is not None and snap.length == len(PROMPT) + 3 and nxt.computed == nxt.cached == snap.length
    runner.prefill(nxt, turn[nxt.computed :])
    got = runner.start_decoding(nxt)
    torch.testing.assert_close(got[0], _alone(model, turn)[0][:V], **TOL)
    # start_decoding kept the whole prompt: the same prompt again is a full hit, its logits without a prefill.
    again = _request("c", turn)
    assert runner.begin(again).length == len(turn) and again.computed == len(turn)
    torch.testing.assert_close(runner.start_decoding(again)[0], got[0], **TOL)
    a, b = nxt.seqs[0], again.seqs[0]
    a.output_ids.append(60)
    b.output_ids.append(60)
    _, logits = runner.decode()
    want = model.decode(torch.tensor([60]), _alone(model, turn)[1])[0][0, :V]
    torch.testing.assert_close(logits, want.expand(2, V), **TOL)


@torch.inference_mode()
def test_prompt_logprobs_start_from_scratch_and_return_every_position(runner):
    model, V = runner.model, runner.vocab
    done = _request("a", PROMPT)
    _prompt_through_runner(runner, done)  # the prompt is now cached
    r = _request("b", PROMPT)
    r.req.params.prompt_logprobs = True
    assert runner.begin(r) is None and r.computed == 0
    every = runner.prefill(r, PROMPT)
    want = model.prefill(torch.tensor([PROMPT]), model.empty_state(1), all_logits=True)[0][0, :, :V]
    torch.testing.assert_close(every, want, **TOL)
    torch.testing.assert_close(r.last_logits, want[-1], **TOL)


def test_step_timer_reads_cuda_events_once_the_gpu_has_passed_them(monkeypatch):
    """On CUDA a step's call returns when its kernels are queued: the timer reads CUDA events, never waits for
    them (no synchronize), and reports each step once the GPU has passed its end event."""
    from server.engine.model_runner import StepTimer

    class Event:  # stands in for torch.cuda.Event: 5 ms between a step's two events, done when the GPU says so
        gpu_done = False

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            pass

        def query(self) -> bool:
            return Event.gpu_done

        def elapsed_time(self, end) -> float:
            return 5.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer, seen = StepTimer(torch.device("cuda")), []
    assert timer.time(3, lambda: "logits", lambda b, s: seen.append((b, s))) == "logits"
    assert seen == []  # the GPU is still on it
    Event.gpu_done = True
    timer.time(4, lambda: None, lambda b, s: seen.append((b, s)))
    assert seen == [(3, 0.005), (4, 0.005)] and timer.pending == []
    cpu, seen = StepTimer(torch.device("cpu")), []
    cpu.time(2, lambda: None, lambda b, s: seen.append(b))
    assert seen == [2]
