#!/usr/bin/env python3
"""serve_bench.py - a load generator for OpenAI-compatible servers, in the
manner of vLLM's benchmark_serving: fixed concurrency or a Poisson request
rate, prompt and output lengths drawn from a seeded distribution, streaming
requests, and a report of requests/s, output tokens/s, time to first token
and inter-token latency (p50 / p99), as a table and as JSON.

It works against any server that speaks /v1/completions with token-id
prompts and `ignore_eos` (kiln serve, llama.cpp's llama-server, vLLM).
Prompts are random token ids (exact input lengths, the same for every
server reading the same GGUF); each request asks for exactly its output
length (max_tokens with ignore_eos).  Only the Python standard library is
used: one thread per in-flight request.

    bench/serve_bench.py --base-url http://127.0.0.1:8080 --concurrency 8 \\
        --num-prompts 64 --input-len 128 --output-len 128 --json out.json
    bench/serve_bench.py --compare DIR      # side by side from JSON files

Metrics follow vLLM: TTFT = first streamed token - request sent; ITL =
time between successive streamed chunks of a request; TPOT = (e2e - TTFT)
/ (output tokens - 1); output tok/s = all output tokens / wall time.
"""
import argparse
import glob
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.parse


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sample_lengths(rng, n, mean, ratio):
    """vLLM's random dataset: uniform in [mean * (1 - ratio), mean * (1 + ratio)]."""
    lo = max(1, int(mean * (1 - ratio)))
    hi = max(lo, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


class Request:
    def __init__(self, prompt, max_tokens):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.ok = False
        self.error = ""
        self.ttft = None
        self.itl = []
        self.e2e = None
        self.output_tokens = 0


def run_request(url, model, api_key, req, timeout):
    u = urllib.parse.urlparse(url)
    body = json.dumps({
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    })
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        conn.request("POST", "/v1/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            req.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            j = json.loads(data)
            if j.get("error"):
                req.error = str(j["error"])
                return
            if j.get("usage"):
                usage_tokens = j["usage"].get("completion_tokens")
            choices = j.get("choices") or []
            if not choices or not (choices[0].get("text") or choices[0].get("finish_reason")):
                continue
            if not choices[0].get("text") and chunks > 0:
                continue  # an empty closing chunk is not a token
            now = time.perf_counter()
            if last is None:
                req.ttft = now - t0
            else:
                req.itl.append(now - last)
            last = now
            chunks += 1
        req.e2e = time.perf_counter() - t0
        req.output_tokens = usage_tokens if usage_tokens is not None else chunks
        req.ok = req.ttft is not None
        if not req.ok:
            req.error = "no token streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is reported, not raised
        req.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def first_model(url, api_key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    headers = {"Authorization": "Bearer " + api_key} if api_key else {}
    conn.request("GET", "/v1/models", headers=headers)
    j = json.loads(conn.getresponse().read())
    return j["data"][0]["id"]


def run(args):
    rng = random.Random(args.seed)
    model = args.model or first_model(args.base_url, args.api_key)
    ins = sample_lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    outs = sample_lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    reqs = [Request([rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(n)], m)
            for n, m in zip(ins, outs)]

    # warm-up (not measured): the first requests pay one-time costs
    warm = [Request([rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(16)], 4)
            for _ in range(args.warmup)]
    for w in warm:
        run_request(args.base_url, model, args.api_key, w, args.timeout)

    sem = threading.Semaphore(args.concurrency if args.concurrency > 0 else len(reqs))
    threads = []
    t_start = time.perf_counter()

    def worker(r):
        try:
            run_request(args.base_url, model, args.api_key, r, args.timeout)
        finally:
            sem.release()

    for r in reqs:
        if args.request_rate > 0:  # Poisson arrivals
            time.sleep(rng.expovariate(args.request_rate))
        sem.acquire()
        t = threading.Thread(target=worker, args=(r,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start

    ok = [r for r in reqs if r.ok]
    failed = [r for r in reqs if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(len(r.prompt) for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    e2e = [r.e2e * 1e3 for r in ok]
    res = {
        "label": args.label, "base_url": args.base_url, "model": model,
        "concurrency": args.concurrency, "request_rate": args.request_rate,
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "range_ratio": args.range_ratio, "seed": args.seed,
        "completed": len(ok), "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "duration_s": wall, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "mean_ttft_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "p50_ttft_ms": percentile(ttft, 50), "p99_ttft_ms": percentile(ttft, 99),
        "mean_tpot_ms": statistics.fmean(tpot) if tpot else float("nan"),
        "p50_tpot_ms": percentile(tpot, 50), "p99_tpot_ms": percentile(tpot, 99),
        "mean_itl_ms": statistics.fmean(itl) if itl else float("nan"),
        "p50_itl_ms": percentile(itl, 50), "p99_itl_ms": percentile(itl, 99),
        "p50_e2e_ms": percentile(e2e, 50), "p99_e2e_ms": percentile(e2e, 99),
    }
    return res


ROWS = [
    ("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
    ("duration (s)", lambda r: f"{r['duration_s']:.2f}"),
    ("requests/s", lambda r: f"{r['request_throughput']:.3f}"),
    ("output tok/s", lambda r: f"{r['output_throughput']:.1f}"),
    ("total tok/s", lambda r: f"{r['total_token_throughput']:.1f}"),
    ("TTFT p50 (ms)", lambda r: f"{r['p50_ttft_ms']:.1f}"),
    ("TTFT p99 (ms)", lambda r: f"{r['p99_ttft_ms']:.1f}"),
    ("TPOT p50 (ms)", lambda r: f"{r['p50_tpot_ms']:.1f}"),
    ("ITL p50 (ms)", lambda r: f"{r['p50_itl_ms']:.1f}"),
    ("ITL p99 (ms)", lambda r: f"{r['p99_itl_ms']:.1f}"),
    ("E2E p50 (ms)", lambda r: f"{r['p50_e2e_ms']:.1f}"),
]


def print_table(results):
    """Results side by side, one column each."""
    heads = [r.get("label") or r["base_url"] for r in results]
    width = max([20] + [len(h) + 2 for h in heads])
    print(f"{'':22}" + "".join(f"{h:>{width}}" for h in heads))
    for name, fn in ROWS:
        print(f"{name:22}" + "".join(f"{fn(r):>{width}}" for r in results))
    for r in results:
        if r["errors"]:
            print(f"{r.get('label')}: errors: {r['errors']}")


def compare(directory):
    """Side by side from the JSON files of a directory, grouped by concurrency."""
    results = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(directory, "*.json")))]
    by_c = {}
    for r in results:
        by_c.setdefault(r["concurrency"], []).append(r)
    for c in sorted(by_c):
        rs = sorted(by_c[c], key=lambda r: r.get("label", ""))
        print(f"\n## concurrency {c}: {rs[0]['num_prompts']} requests, input {rs[0]['input_len']}, "
              f"output {rs[0]['output_len']} tokens (+-{int(rs[0]['range_ratio'] * 100)} %)")
        print_table(rs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", help="model name (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8,
                    help="requests in flight at most (0: no bound, with --request-rate)")
    ap.add_argument("--request-rate", type=float, default=0,
                    help="Poisson arrivals per second (0: all at once, bounded by concurrency)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.0,
                    help="lengths uniform in mean * [1 - r, 1 + r]")
    ap.add_argument("--vocab-lo", type=int, default=1000, help="prompt token ids from here ...")
    ap.add_argument("--vocab-hi", type=int, default=10000, help="... to here (exclusive)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--compare", metavar="DIR", help="print JSON results of DIR side by side")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return 0
    res = run(args)
    print_table([res])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
