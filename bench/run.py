"""One command for the whole benchmark suite: python bench/run.py [--quick]

Ours, transformers and llama.cpp run in turn on the same random mamba-130m-size weights, so their ratios are
comparable; each figure is the median of --repeats runs with the spread (min-max). Each llama.cpp measurement
runs in a process of its own (bench/common.isolated), so a peer that crashes (llama.cpp's Q8_0 segfaults on
some AMX CPUs) shows as "crashed" in its cells and the run goes on.
Writes bench/results/results.md, results.json and PNG plots. Run it on an idle machine: two torch workloads
on 2 cores slow each other 5-7x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from aetheris.defaults import DEFAULT_MODEL_DIR as DEFAULT_MODEL  # noqa: E402
from bench import common, ours, servers  # noqa: E402
from bench import hf as hf_bench  # noqa: E402
from bench import http_load as http_bench  # noqa: E402
from bench import quantize as quantize_bench  # noqa: E402
from bench.report import to_json, write  # noqa: E402
from bench.weights import mamba_130m, to_gguf  # noqa: E402
from model import gemv  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.packed import packing_pays_here  # noqa: E402
from model.prepare import NotSupported, Speedups, configure_cpu_for_serving, prepare_for_inference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"


def load_ours(path: Path, dtype: torch.dtype = torch.float32, speedups: Speedups = common.OURS["ours"]):
    """Our model as the server loads it with the flags a benchmark row names (NotSupported where this machine
    cannot run them)."""
    model, tok = load_model(path, dtype=dtype)
    prepare_for_inference(model, speedups, strict=True)
    configure_cpu_for_serving()
    return model, tok


def default_linears() -> str:
    """What serves the projections by default on this machine, in words."""
    if gemv.load():
        return f"the few-row kernel (model/gemv.py; bf16 inner kernel: {gemv.bf16_kernel()})"
    fp32, bf16 = packing_pays_here(torch.float32), packing_pays_here(torch.bfloat16)
    return f"no C++ compiler: oneDNN packing for fp32 {fp32}, bf16 {bf16}"


def load_variants(path: Path, dtype: torch.dtype, systems, unsupported: dict) -> dict:
    """{system: (model, tok)} for the systems this machine runs; the rest go to `unsupported` with the reason."""
    name = str(dtype).split(".")[1]
    variants = {}
    for system in systems:
        try:
            variants[system] = load_ours(path, dtype, common.OURS[system])
        except NotSupported as e:
            unsupported[f"{system} / {name}"] = str(e)
            print(f"{system} {name}: not supported here: {e}", flush=True)
    return variants


def decode_suite(args, hf_dir: Path, gguf: dict | None, unsupported: dict) -> dict:
    out: dict = {}
    n = args.repeats
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        variants = load_variants(hf_dir, dtype, list(common.OURS), unsupported)
        ref = hf_bench.load(hf_dir, dtype)
        for b in args.batches:
            runs = {
                (system, name, b): (ours.decode_tokens_per_s, model, tok, b, args.tokens)
                for system, (model, tok) in variants.items()
            }
            runs[("transformers", name, b)] = (hf_bench.decode_tokens_per_s, ref, b, args.tokens)
            if gguf is not None:
                from bench import llamacpp

                run = (common.isolated, llamacpp.decode_tokens_per_s)  # each in its own process: it may crash
                runs[("llama.cpp", name, b)] = (*run, str(gguf[dtype]), b, args.tokens)
                if dtype == torch.float32:  # Q8_0 keeps fp32 activations, like our int8 rows of the fp32 model
                    runs[("llama.cpp Q8_0", name, b)] = (*run, str(gguf["q8_0"]), b, args.tokens)
            out.update(common.interleaved(n, runs))
            print({k: common.fmt(v) for k, v in out.items() if k[2] == b and k[1] == name}, flush=True)
    return out


def prefill_suite(args, hf_dir: Path, gguf: dict | None, unsupported: dict) -> dict:
    out: dict = {}
    variants = load_variants(hf_dir, torch.float32, ("ours", "ours --no-compile"), unsupported)
    ref = hf_bench.load(hf_dir, torch.float32)
    for length in args.prefill:
        runs = {(system, length): (ours.prefill_tokens_per_s, model, length) for system, (model, _) in variants.items()}
        runs[("transformers", length)] = (hf_bench.prefill_tokens_per_s, ref, length)
        if gguf is not None:
            from bench import llamacpp

            run = (common.isolated, llamacpp.prefill_tokens_per_s)
            runs[("llama.cpp", length)] = (*run, str(gguf[torch.float32]), length)
        out.update(common.interleaved(args.repeats, runs))
    return out


def server_suite(args, hf_dir: Path) -> dict:
    """Peak RSS with 1 and 32 live sequences, and 32 streaming clients vs the offline engine at batch 32 (with
    the server's CPU seconds per token, which the clients' CPU on the same cores does not enter)."""
    from aetheris.serverproc import ServerProcess

    out = {}
    s = ServerProcess(
        hf_dir, "--served-model-name", "bench", "--threads", "2", "--max-batch-size", "32", "--compile", timeout=600
    )
    try:
        http_bench.stream_clients(s.url, 1, 64)
        out["rss_1_mb"] = http_bench.peak_rss_mb(s.proc.pid)
        out["http_32"] = http_bench.stream_clients(s.url, 32, args.tokens, s.proc.pid)
        out["rss_32_mb"] = http_bench.peak_rss_mb(s.proc.pid)
    finally:
        s.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per sequence in decode runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--far", type=int, default=10_000, help="position of the far decode-latency probe")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (pip install llama-cpp-python)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where results.md / .json / .png go")
    p.add_argument("--quick", action="store_true", help="1 repeat, 32 tokens, batches 1 and 8, prefill 512")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.tokens, args.batches, args.prefill, args.far = 1, 32, [1, 8], [512], 2000
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_dir = mamba_130m(WORK / "mamba-130m-random", tokenizer_dir=DEFAULT_MODEL)
    gguf = None
    if not args.no_llamacpp:
        try:
            import llama_cpp  # noqa: F401

            gguf = {torch.float32: to_gguf(hf_dir, WORK, "f32"), torch.bfloat16: to_gguf(hf_dir, WORK, "bf16")}
            gguf["q8_0"] = to_gguf(hf_dir, WORK, "q8_0")
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp columns skipped", flush=True)
    report = {
        "machine": common.machine_line(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": {**vars(args), "out": os.path.relpath(args.out.resolve(), ROOT)},
        "command": " ".join(["python bench/run.py", *sys.argv[1:]]),
        "unsupported": {},
        "failed": {},
        "default_linears": default_linears(),
    }
    for name, stage in stages(args, hf_dir, gguf, report):
        try:
            stage()
        except Exception as e:  # measure what this machine can run; one failed stage does not lose the others
            report["failed"][name] = f"{type(e).__name__}: {e}"
            print(f"stage {name} failed: {report['failed'][name]}", flush=True)
        (args.out / "results.partial.json").write_text(to_json(report))  # a run that stops later keeps these
    write(report, args.out)


def stages(args, hf_dir: Path, gguf: dict | None, report: dict):
    """(name, callable) in run order; each callable stores its figures in `report`."""
    unsupported = report["unsupported"]

    def roofline():
        report["roofline"] = {
            "fp32_flops": common.matmul_flops(torch.float32),
            "bf16_flops": common.matmul_flops(torch.bfloat16),
            "read_samples": [common.read_bandwidth()],
        }

    def decode():
        report["decode"] = decode_suite(args, hf_dir, gguf, unsupported)
        # The memory bandwidth of this shared VM moves with its neighbours' load (seen: 45 to 84 GB/s within an
        # hour), so it is sampled before and after the decode runs and the higher figure is the roofline.
        report["roofline"]["read_samples"].append(common.read_bandwidth())

    def latency():
        model, tok = load_ours(hf_dir, speedups=Speedups(compile="ours / float32" not in unsupported))
        report["latency"] = {pos: ours.decode_latency_at(model, pos) for pos in (100, args.far)}
        if 32 in args.batches:
            cpu = time.process_time()
            report["offline_32"] = ours.decode_tokens_per_s(model, tok, 32, args.tokens)
            report["offline_32_cpu_s_per_token"] = (time.process_time() - cpu) / (32 * args.tokens)

    def default_model():
        """The MoE default model, compiled: on the few-row kernel (the server's default), with every Linear and its
        experts packed, with only the experts left unpacked, and in int8; decode tokens/s per batch."""
        compile = "ours / float32" not in unsupported
        variants = {
            "few-row kernel": Speedups(compile=compile),
            "experts packed": Speedups(pack=True, compile=compile),
            "experts unpacked": Speedups(pack=True, pack_experts=False, compile=compile),
            "int8": Speedups(quantize="int8", compile=compile),
        }
        report["default_model"] = {}
        for name, speedups in variants.items():
            model, tok = load_ours(DEFAULT_MODEL, speedups=speedups)
            report["default_model"][name] = {
                b: ours.decode_tokens_per_s(model, tok, b, args.tokens) for b in args.batches
            }

    return [
        ("roofline", roofline),
        ("decode", decode),
        ("prefill", lambda: report.update(prefill=prefill_suite(args, hf_dir, gguf, unsupported))),
        ("latency", latency),
        ("memory", lambda: report.update(memory=memory_figures(load_model(hf_dir)[0]))),  # unpacked weights
        ("default_model", default_model),
        ("server", lambda: report.update(server=server_suite(args, hf_dir))),
        ("servers", lambda: report.update(servers=servers.compare(hf_dir, gguf and gguf[torch.float32]))),
        ("quantization quality", lambda: report.update(quality=quantize_bench.run(hf_dir=hf_dir))),
    ]


def memory_figures(model) -> dict:
    cfg = model.config
    state = model.empty_state(1).bytes_per_sequence()["fixed"]  # a pure SSM: nothing grows with the length
    kv = {n: 2 * cfg.n_layers * cfg.d_model * n * 4 for n in (4096, 32768)}  # K and V, fp32, same width
    return {
        "state_bytes": state,
        "kv_bytes": kv,
        # what one decode step streams: every weight once (a tied head reads the embedding matrix)
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


if __name__ == "__main__":
    main()
