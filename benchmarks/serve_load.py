"""Load on `zhllama serve`: aggregate tokens/s and time to first token at 1, 4 and 16 concurrent streaming clients.

Starts `zhllama serve` as a subprocess on a free port (--max-concurrency 16, --device cpu) over --model, or over
a tiny random Llama made on the spot (Llama-2 vocabulary, atom chat template). Each client sends streaming chat
requests with Chinese prompts back to back (temperature 0.7, stream_options.include_usage) for a fixed number of
requests; the levels are run in rounds, interleaved, so drift in the machine's load hits every level alike.
For comparison, the same model is loaded in this process and `model.generate` runs the same prompts one at a
time with min_new_tokens = max_new_tokens. With a CUDA GPU, --gpu-decode adds batch-1 bf16 decode tokens/s
against the memory-bandwidth bound (weight bytes per token / bandwidth); it is skipped on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, machine

PROMPTS = ["请介绍一下北京的历史。", "写一首关于春天的短诗。", "什么是机器学习？请简单解释。",
           "给我讲一个关于猫的故事。", "如何学好中文？", "请解释一下光合作用。",
           "上海有哪些好吃的？", "为什么天空是蓝色的？"]


def make_tiny_model(work: Path) -> Path:
    """A random tiny Llama with the Llama-2 vocabulary and the atom chat template (made once, then reused)."""
    from zhllama import model, tokenizer
    from zhllama.assets import llama2_vocab_gguf
    from zhllama.chat import get_template
    from zhllama.tokenizer.hf import set_chat_template

    folder = work / "model"
    if (folder / "config.json").exists():
        return folder
    tok = tokenizer.from_gguf(llama2_vocab_gguf(), work / "tok")
    folder = Path(model.init_model("tiny", tok, folder, seed=0))
    set_chat_template(folder, get_template("atom").jinja)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, concurrency: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zhllama", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-concurrency", str(concurrency), "--device", "cpu", "--name", "bench"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    sys.exit(f"the server did not answer /health within 180 s; see {log}")


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, chunks, usage, done = None, 0, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": event["error"].get("message", "error event")}
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    if not done:
        return {"error": "stream ended without [DONE]"}
    tokens = usage["completion_tokens"] if usage else chunks
    return {"tokens": tokens, "ttft": ttft, "seconds": time.perf_counter() - start}


async def run_level(url: str, clients: int, requests_per_client: int, max_tokens: int, offset: int) -> dict:
    """`clients` clients, each sending `requests_per_client` streaming requests back to back."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one_client(c: int) -> list[dict]:
            out = []
            for r in range(requests_per_client):
                prompt = PROMPTS[(offset + c * requests_per_client + r) % len(PROMPTS)]
                try:
                    out.append(await stream_one(client, prompt, max_tokens))
                except httpx.HTTPError as exc:
                    out.append({"error": f"{type(exc).__name__}: {exc}"})
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in good if r["ttft"] is not None)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(good),
            "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
            "tokens": sum(r["tokens"] for r in good), "seconds": wall, "ttfts": ttfts}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def hf_sequential(model_dir: Path, prompts: list[str], max_tokens: int, threads: int | None) -> dict:
    """`model.generate` on one prompt at a time, exactly max_tokens new tokens each, sampled at 0.7."""
    import torch

    from zhllama.infer.prompt import prompt_builder
    from zhllama.model.loading import load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    builder = prompt_builder(tok, None)
    model = load_model(model_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    encoded = [builder.encode([{"role": "user", "content": p}], max_prompt_tokens=4096) for p in prompts]
    warm = torch.tensor([encoded[0]])
    model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=True)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for ids in encoded:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            tokens += out.shape[1] - x.shape[1]
    seconds = time.perf_counter() - start
    return {"requests": len(encoded), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def gpu_decode(model_dir: Path, max_tokens: int, bandwidth_gbs: float) -> dict:
    """Batch-1 bf16 decode tokens/s on the GPU, and the bound that streaming every weight once per token sets."""
    import torch

    from zhllama.model.loading import load_model

    model = load_model(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16).to("cuda").eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.tensor([[1] + [100] * 31], device="cuda")
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tok_s = (out.shape[1] - ids.shape[1]) / seconds
    bound = bandwidth_gbs * 1e9 / weight_bytes
    return {"weight_bytes": weight_bytes, "tok_s": tok_s, "bandwidth_gbs": bandwidth_gbs, "bound_tok_s": bound,
            "fraction_of_bound": tok_s / bound, "gpu": torch.cuda.get_device_name()}


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random model)")
    p.add_argument("--work", type=Path, default=None, help="where the tiny model goes (default: a temp folder)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="requests each client sends per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all levels (levels interleaved)")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--hf-requests", type=int, default=8, help="prompts for the HF sequential arm")
    p.add_argument("--gpu-decode", action="store_true", help="bf16 batch-1 decode vs bandwidth bound (CUDA only)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3350)")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    concurrency = max(16, max(levels))

    tmp = tempfile.TemporaryDirectory(prefix="zhllama-serve-load-")
    work = args.work or Path(tmp.name)
    model_dir = args.model or make_tiny_model(work)
    port = free_port()
    log = work / "server.log"
    url = f"http://127.0.0.1:{port}"
    server = start_server(model_dir, port, concurrency, log)
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    hf_runs = []
    try:
        asyncio.run(run_level(url, 2, 1, 8, 0))  # warm-up, not counted
        for r in range(args.rounds):
            order = levels if r % 2 == 0 else list(reversed(levels))
            for n in order:
                res = asyncio.run(run_level(url, n, args.requests_per_client, args.max_tokens, r * 7 + n))
                runs[n].append(res)
                print(f"round {r + 1}: {n:>2} clients: {res['tokens'] / res['seconds']:.1f} tok/s, "
                      f"{res['errors']} errors, {res['seconds']:.1f} s", flush=True)
            # The HF arm runs in this process while the server idles between levels.
            prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(args.hf_requests // args.rounds or 1)]
            hf_runs.append(hf_sequential(model_dir, prompts, args.max_tokens, None))
            print(f"round {r + 1}: HF generate sequential: {hf_runs[-1]['tok_s']:.1f} tok/s", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    rows, summary = [], {}
    for n in levels:
        tokens = sum(x["tokens"] for x in runs[n])
        seconds = sum(x["seconds"] for x in runs[n])
        ttfts = [t for x in runs[n] for t in x["ttfts"]]
        summary[n] = {"clients": n, "requests": sum(x["requests"] for x in runs[n]),
                      "errors": sum(x["errors"] for x in runs[n]),
                      "error_samples": sorted({e for x in runs[n] for e in x["error_samples"]})[:3],
                      "tokens": tokens, "seconds": round(seconds, 2), "tok_s": tokens / seconds if seconds else 0.0,
                      "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
                      "per_round_tok_s": [round(x["tokens"] / x["seconds"], 2) for x in runs[n]]}
    hf_tokens = sum(x["tokens"] for x in hf_runs)
    hf_seconds = sum(x["seconds"] for x in hf_runs)
    hf = {"requests": sum(x["requests"] for x in hf_runs), "tokens": hf_tokens, "seconds": round(hf_seconds, 2),
          "tok_s": hf_tokens / hf_seconds}
    lo, hi = min(levels), max(levels)
    scale = summary[hi]["tok_s"] / summary[lo]["tok_s"] if summary[lo]["tok_s"] else None
    vs_hf = summary[hi]["tok_s"] / hf["tok_s"] if hf["tok_s"] else None

    gpu = None
    if args.gpu_decode:
        import torch

        if torch.cuda.is_available():
            gpu = gpu_decode(model_dir, max(args.max_tokens, 128), args.bandwidth_gbs)
        else:
            gpu = {"skipped": "no CUDA GPU"}
            print("--gpu-decode: skipped, no CUDA GPU", flush=True)

    import torch

    load = os.getloadavg()
    lines = [f"`zhllama serve` over {'a tiny random model' if args.model is None else model_dir}; max_tokens "
             f"{args.max_tokens}, temperature 0.7, {args.rounds} rounds x {args.requests_per_client} requests per "
             f"client; --max-concurrency {concurrency}, CPU, {os.cpu_count()} cores, torch threads "
             f"{torch.get_num_threads()}, load average {load[0]:.1f} at the end. {time.strftime('%Y-%m-%d')}.", "",
             "| arm | requests | errors | generated tokens | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |",
             "|---|---|---|---|---|---|---|"]
    for n in levels:
        s = summary[n]
        rows.append(s)
        lines.append(f"| {n} streaming client{'s' if n > 1 else ''} | {s['requests']} | {s['errors']} | "
                     f"{s['tokens']} | {s['tok_s']:.1f} | {fmt(s['ttft_p50_s'])} | {fmt(s['ttft_p95_s'])} |")
    lines.append(f"| HF generate, one request at a time | {hf['requests']} | 0 | {hf['tokens']} | "
                 f"{hf['tok_s']:.1f} | - | - |")
    errors = sum(summary[n]["errors"] for n in levels)
    lines += ["", f"{hi} clients / {lo} client aggregate tok/s: **{fmt(scale)}x** (goal >= 5x with 0 errors; "
                  f"{errors} errors)", f"{hi} clients / HF sequential: **{fmt(vs_hf)}x**"]
    if gpu and "skipped" not in gpu:
        lines.append(f"GPU decode (bf16, batch 1, {gpu['gpu']}): {gpu['tok_s']:.1f} tok/s; bandwidth bound "
                     f"{gpu['bound_tok_s']:.0f} tok/s ({gpu['weight_bytes'] / 1e6:.0f} MB weights at "
                     f"{gpu['bandwidth_gbs']:.0f} GB/s): {gpu['fraction_of_bound']:.0%} of the bound")
    markdown = "\n".join(lines)
    payload = {"model": str(model_dir) if args.model else "tiny random (Llama-2 vocab, atom template)",
               "max_tokens": args.max_tokens, "rounds": args.rounds, "requests_per_client": args.requests_per_client,
               "levels": summary, "hf_sequential": hf, "scaling": scale, "vs_hf_sequential": vs_hf,
               "gpu_decode": gpu, "torch_threads": torch.get_num_threads(), "load_average": load,
               "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
