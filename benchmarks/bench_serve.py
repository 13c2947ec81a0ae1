"""`frozenvl serve` under load: 1, 4 and 16 concurrent clients, with and without batching, in one run.

A small random model (Llama text model, hidden `--hidden`, `--layers` layers; a tiny CLIP tower; one
`prefix` workflow `mm`) is built in code and saved; `frozenvl serve` runs it in its own process,
once with `--max-batch-size 1` (no batching: requests decode one after another) and once with
`--max-batch-size 16`. Each client is a thread with its own `openai` client sending streamed
greedy requests one after another, alternating a text request and an `mm` request with a data-URL
image; every client sends `--requests` requests.

Reported per (batching, clients): requests/s and generated tokens/s over the wall time of the whole
round, p50 / p99 request latency, p50 / p99 time to first token (the first content chunk). The
summary line gives the 16-client throughput with batching over the 1-client throughput without it
(the issue's target: >= 3x) and over 16 clients without batching. The clients run in this process
and compete with the server for the CPU: on a shared machine the numbers are only as good as the
machine is quiet (the load average is printed).

    python benchmarks/bench_serve.py [--requests 6] [--max-tokens 32] [--hidden 128] [--layers 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_load, load_average, log, quiet

SRC = str(Path(__file__).resolve().parents[1] / "src")
CLIENTS = (1, 4, 16)


def build_model(root: Path, hidden: int, layers: int) -> Path:
    import torch

    import frozenvl
    from frozenvl.tiny import build_llm, build_tokenizer, build_vision

    llm_dir = root / "llm"
    build_tokenizer(llm_dir)
    build_llm(llm_dir, tokenizer_dir=llm_dir, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2)
    vision = build_vision(root / "vision")
    torch.manual_seed(0)
    model = frozenvl.build(str(llm_dir), vision, workflows={"mm": {"family": "prefix"}})
    out = root / "model"
    model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, batch: int, threads: int):
    import openai

    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "frozenvl", "serve", str(model_dir), "--port", str(port),
                             "--max-batch-size", str(batch), "--max-queue", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            client.models.list()
            return proc, port
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not come up in 180 s") from None
            time.sleep(0.2)


def image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(client, k: int, max_tokens: int, url: str) -> tuple[float, float, int]:
    """(latency, time to first token, generated tokens) of one streamed greedy request."""
    if k % 2:
        model, content = "mm", [{"type": "image_url", "image_url": {"url": url}},
                                {"type": "text", "text": f"what is in picture {k}"}]
    else:
        model, content = "text", f"tell me about the number {k}"
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return total, first if first is not None else total, tokens


def run_round(port: int, clients: int, requests: int, max_tokens: int, url: str) -> dict[str, float]:
    import openai

    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            out = one_request(client, c * requests + r, max_tokens, url)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"req_s": len(results) / wall, "tok_s": sum(r[2] for r in results) / wall,
            "p50": statistics.median(lat), "p99": pct(lat, 0.99), "ttft50": statistics.median(ttft),
            "ttft99": pct(ttft, 0.99), "n": len(results), "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    args = ap.parse_args()
    quiet()
    t0, load0 = time.perf_counter(), load_average()
    table: dict[tuple[int, int], dict[str, float]] = {}
    url = image_url()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        log("building the model ...")
        model_dir = build_model(Path(tmp), args.hidden, args.layers)
        for batch in (1, 16):
            log(f"server with --max-batch-size {batch} ...")
            proc, port = start_server(model_dir, batch, args.threads)
            try:
                run_round(port, 2, 1, args.max_tokens, url)  # warm-up
                for clients in CLIENTS:
                    log(f"  {clients} client(s) ...")
                    table[(batch, clients)] = run_round(port, clients, args.requests, args.max_tokens, url)
            finally:
                proc.kill()
                proc.wait()

    print(f"frozenvl serve ({args.threads} torch thread(s)), Llama hidden {args.hidden} x {args.layers} layers + "
          f"tiny CLIP, greedy, "
          f"max_tokens {args.max_tokens}, {args.requests} streamed requests per client (text / image alternating)")
    print(f"{'batching':<10}{'clients':>8}{'req/s':>9}{'tok/s':>9}{'p50 s':>9}{'p99 s':>9}{'TTFT p50':>10}"
          f"{'TTFT p99':>10}")
    for (batch, clients), r in table.items():
        label = "off (1)" if batch == 1 else f"on ({batch})"
        print(f"{label:<10}{clients:>8}{r['req_s']:>9.2f}{r['tok_s']:>9.1f}{r['p50']:>9.3f}{r['p99']:>9.3f}"
              f"{r['ttft50']:>10.3f}{r['ttft99']:>10.3f}")
    seq, off16, on16 = table[(1, 1)], table[(1, 16)], table[(16, 16)]
    print(f"16 clients with batching: {on16['tok_s'] / seq['tok_s']:.2f}x the tokens/s of 1 client without "
          f"batching (target >= 3x), {on16['req_s'] / seq['req_s']:.2f}x its requests/s; "
          f"{on16['tok_s'] / off16['tok_s']:.2f}x the tokens/s of 16 clients without batching")
    print(f"total time {time.perf_counter() - t0:.0f}s; load average (1/5/15 min) at start {fmt_load(load0)}, "
          f"at end {fmt_load(load_average())} on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
