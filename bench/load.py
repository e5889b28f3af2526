"""Load on the gatekeeper: many clients through NATS, HTTP and the inbox at once; one verdict each.

    .venv/bin/python -m bench.load [--datasets 1000] [--clients 20] [--split 7,7,6] [--baseline 200]
                                   [--seed 0] [--data-dir DIR] [--keep DIR]

The stack: a real nats-server and the real gatekeeper service as a child process, started by
`flywheel.supervisor.Supervisor` (services=("gatekeeper",), a free port block, a temporary data
directory), with the embedded tiny model's tokenizer (created under --data-dir, a temporary
folder by default). No trainer: the accepted datasets wait in the DATASETS stream.

The datasets, generated from --seed, all distinct submissions with their own names: small
chat_sft_v1 datasets of 2-30 rows (70 %), 31-200 (25 %) or 201-1,000 (5 %), at level standard
(80 %), quick (15 %) or deep (5 %), priority normal, high or low; of them 5 % carry one bad
row among 20+ (accepted, that row dropped), 10 % are invalid (broken JSON lines, no assistant
answer, a role the schema refuses, empty, a PNG, an unknown schema: rejected), and 10 % are
exact resubmissions of an earlier valid dataset through another channel (the same rows:
one of the two is accepted, the other answered as its duplicate; which one depends on who
claims the content first when they race).

The clients: --clients asyncio tasks, split over the channels by --split (NATS,HTTP,inbox
counts; default about a third each), submission i going to client i mod clients:
- NATS: half the rows inline in a `DatasetSubmitted` event (any NATS client, the README's way),
  half as the CLI does (`flywheel.submit.submit_file`: the file put in the artifact store, its
  uri published; invalid bytes always so); the verdict is the `dataset.accepted.*` /
  `dataset.rejected` event naming the submission. Each client waits for each verdict before
  its next submission, as `flywheel submit --wait` does;
- HTTP: `POST /datasets` (raw body) or `POST /datasets/upload` (multipart), alternately; the
  reply is the verdict (and must agree with the event); one request at a time per client;
- inbox: each file written beside the inbox and renamed into it (its priority folder, marks in
  the name for level and schema), as the README advises, one after another without waiting:
  dropping files in a folder is fire and forget, so the inbox clients flood it at once; the
  verdict is the event. The gatekeeper takes a renamed-in file once it has settled
  (settle_seconds, 1 s by default) and one file at a time, so an inbox file's latency is that
  second plus its wait behind the files dropped before it.
Latency: from the submission's start (the publish, the request, the rename) to its verdict.

First the baseline: one client submitting --baseline datasets (its own, generated alike) one
after another, waiting for each verdict, alternately over NATS and HTTP. Not through the
inbox: one file at a time, each waiting out the settle second, would measure that second,
not the gatekeeper. Then the load. Then, once the gatekeeper is idle (its consumer has
nothing pending or unacknowledged, the inbox and its uploads folder are empty, every
acceptance is marked announced), the audit (bench/load_audit.py) reads every
`dataset.accepted.*` and `dataset.rejected` message in the DATASETS stream and each one's
report: every submission (baseline and load) exactly one verdict, the expected one, none
lost, none twice, no dataset accepted twice.

Memory: the gatekeeper process's RSS (psutil) every 0.1 s through the run; its peak, and its
growth over the load: the median RSS of the load's last quarter minus that of its first.

Targets: lost = 0, duplicated = 0, wrong verdicts = 0, no gatekeeper restart. Memory bounded:
peak RSS <= 400 MB (the tokenizer and the libraries make a start-up RSS of ~305 MB; validation
streams each file in 64 KiB blocks, so no dataset should add more than a few MB) and growth
<= 25 MB from the load's first quarter to its last: a leak of only 25 kB a dataset would break
it at 1,000 datasets, while what is measured (+8 to +13 MB) is the warm-up of the first few
hundred (allocator arenas, the tokenizer's cache), +8 MB as well over 4,000 datasets.
vs_one_client >= 1: twenty clients at once get at least the throughput of one, i.e. the
gatekeeper's NATS lane, inbox lane and HTTP threads do not fight each other into less work.
More is not to be had from one process: validation holds the GIL, so the gatekeeper uses about
one core at most (~11 ms of CPU a dataset here), and a lone client already keeps it busy
50-80 % of the time (the rest it waits for that client and for fsync), so the ceiling is
1.2-2x (printed: one core over the lone client's share); more throughput means more
gatekeeper replicas on the shared `gatekeeper` consumer. The CPU each side used
is printed with the throughputs. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.load_audit import Audit, Expected, Verdict, audit  # noqa: E402
from libs.common import topology  # noqa: E402
from libs.common.artifacts import ArtifactStore  # noqa: E402
from libs.common.bus import Bus  # noqa: E402
from libs.common.events import PRIORITIES, DatasetAccepted, DatasetSubmitted  # noqa: E402

CHANNELS = ("nats", "http", "inbox")
TARGETS = {"lost": 0, "duplicated": 0, "wrong_verdicts": 0, "gatekeeper_restarts": 0,
           "gatekeeper_peak_rss_mb": 400.0, "rss_growth_mb": 25.0, "vs_one_client": 1.0}
VERDICT_TIMEOUT_S = 180.0
START_TIMEOUT_S = 180.0
IDLE_TIMEOUT_S = 120.0
RSS_EVERY_S = 0.1
_encoder = msgspec.json.Encoder()

# ---------------------------------------------------------------------------- the datasets

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful tutor.")
TOPICS = ("the moon", "photosynthesis", "a lighthouse", "the Thames", "binary numbers", "volcanoes", "bees",
          "glaciers", "the violin", "tides", "interest rates", "the printing press")
ASKS = ("What is {t}?", "Explain {t} simply.", "Give one fact about {t}.", "Why does {t} matter?")
INVALID = ("broken_json", "no_answer", "bad_role", "empty", "png", "unknown_schema")


@dataclass
class Planned:
    """One submission: its dataset, its channel and what it should get."""

    name: str
    channel: str
    priority: str
    level: str
    kind: str  # valid | flawed | resubmission | one of INVALID
    rows: list[dict] | None = None
    raw: bytes | None = None  # bytes that are no rows (invalid files)
    schema: str = "chat_sft_v1"
    expect: str = "accepted"
    group: str = ""  # the first member's name, for the same content submitted twice
    http_route: str = "/datasets"  # HTTP: /datasets (raw body) or /datasets/upload (multipart)
    inline: bool = True  # NATS: rows inline in the event, else a uri (as `flywheel submit`)

    def body(self) -> bytes:
        return self.raw if self.raw is not None else b"".join(_encoder.encode(r) + b"\n" for r in self.rows or ())

    def expected(self) -> Expected:
        return Expected(self.name, self.expect, self.group)  # type: ignore[arg-type]


def chat_row(rng: random.Random, tag: str) -> dict:
    """A short question and answer, made unique by `tag`; some with a system prompt or a second turn."""
    topic = rng.choice(TOPICS)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": f"{rng.choice(ASKS).format(t=topic)} ({tag})"},
                 {"role": "assistant", "content": f"In short, {topic} is {rng.randrange(2, 900)} years old."}]
    if rng.random() < 0.15:
        messages += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": f"Case {tag} shows it."}]
    return {"messages": messages}


def row_count(rng: random.Random) -> int:
    r = rng.random()
    return rng.randint(2, 30) if r < 0.70 else rng.randint(31, 200) if r < 0.95 else rng.randint(201, 1000)


def invalid(item: Planned, rng: random.Random, kind: str) -> None:
    """Make `item` a dataset the gatekeeper must reject, of `kind`."""
    rows = [chat_row(rng, f"{item.name}.{k}") for k in range(rng.randint(5, 40))]
    item.kind, item.expect = kind, "rejected"
    if kind == "broken_json":  # 40 % of the lines cut short: above max_error_fraction
        lines = [_encoder.encode(r) for r in rows]
        item.raw = b"".join((line[: len(line) // 2] if k % 5 < 2 else line) + b"\n" for k, line in enumerate(lines))
    elif kind == "no_answer":
        item.rows = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in rows]
    elif kind == "bad_role":
        item.rows = [{"messages": [{**m, "role": "bot"} if m["role"] == "assistant" else m for m in r["messages"]]}
                     for r in rows]
    elif kind == "empty":
        item.rows = []
    elif kind == "png":
        item.raw = b"\x89PNG\r\n\x1a\n" + rng.randbytes(2000)
    else:
        item.rows, item.schema = rows, "chat_sft_v0"


def plan(prefix: str, count: int, channel_of: Callable[[int], str], seed: int) -> list[Planned]:
    """`count` submissions named `<prefix>-<i>`, submission i through `channel_of(i)` (see the module docstring)."""
    rng = random.Random(seed)
    items: list[Planned] = []
    for i in range(count):
        name = f"{prefix}-{i:04d}"
        item = Planned(name=name, channel=channel_of(i), priority=rng.choices(PRIORITIES, (2, 6, 2))[0],
                       level=rng.choices(("standard", "quick", "deep"), (16, 3, 1))[0], kind="valid",
                       http_route=("/datasets", "/datasets/upload")[rng.random() < 0.5], inline=rng.random() < 0.5)
        roll = rng.random()
        # An earlier valid dataset, not yet resubmitted, that went through another channel.
        originals = [p for p in items[: max(0, i - 10)] if p.kind == "valid" and not p.group and p.channel != item.channel]
        if roll < 0.10 and originals:
            original = rng.choice(originals)
            original.group = item.group = original.name
            item.kind, item.rows = "resubmission", original.rows
        elif roll < 0.20:
            invalid(item, rng, rng.choice(INVALID))
        else:
            item.rows = [chat_row(rng, f"{name}.{k}") for k in range(row_count(rng))]
            if roll < 0.25 and len(item.rows) >= 20:  # one bad row among many: dropped, the rest accepted
                item.kind = "flawed"
                item.rows[rng.randrange(len(item.rows))] = {"messages": [{"role": "user", "content": "unanswered"}]}
        items.append(item)
    return items


def channel_split(clients: int, split: str | None) -> list[str]:
    """Each client's channel: --split's NATS,HTTP,inbox counts, else about a third each."""
    if split:
        counts = [int(n) for n in split.split(",")]
        if len(counts) != 3 or sum(counts) != clients or min(counts) < 0:
            raise SystemExit(f"--split: three counts (NATS,HTTP,inbox) adding up to --clients {clients}, got {split!r}")
    else:
        counts = [clients // 3 + (k < clients % 3) for k in range(3)]
    return [channel for channel, n in zip(CHANNELS, counts, strict=True) for _ in range(n)]


# ---------------------------------------------------------------------------- the stack


class Stack:
    """nats-server and the gatekeeper, as `flywheel up` runs them; the gatekeeper's RSS sampled."""

    def __init__(self, data_dir: Path, base_model: Path) -> None:
        from flywheel.demo import free_port_base
        from flywheel.supervisor import Supervisor

        self.data_dir = data_dir
        env = {**os.environ, "FLYWHEEL_BASE_MODEL": str(base_model)}
        self.sup = Supervisor(data_dir, port_base=free_port_base(), services=("gatekeeper",), environ=env)
        self.inbox = data_dir / "inbox"
        self.store = ArtifactStore(data_dir / "artifacts")
        self.rss: list[tuple[float, float]] = []  # (perf_counter, MB)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="rss", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sup.ports['gatekeeper']}"

    @property
    def restarts(self) -> int:
        return self.sup.children["gatekeeper"].restarts

    def cpu_s(self) -> float:
        """The gatekeeper's CPU seconds so far (user and system)."""
        pid = self.pid()
        times = psutil.Process(pid).cpu_times() if pid is not None else None
        return times.user + times.system if times is not None else 0.0

    def pid(self) -> int | None:
        process = self.sup.children["gatekeeper"].process
        return process.pid if process is not None else None

    async def start(self) -> float:
        started = time.perf_counter()
        self.sup.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient() as client:
            while True:
                self.sup.poll()
                try:
                    if (await client.get(f"{self.url}/ready", timeout=5)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gatekeeper was not ready in {START_TIMEOUT_S:.0f} s; see {self.log_tail()}")
                await asyncio.sleep(0.2)
        ready_s = time.perf_counter() - started
        self._sampler.start()
        while not self.rss:
            await asyncio.sleep(RSS_EVERY_S / 2)
        return ready_s

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart the gatekeeper if it dies (counted as a restart: a crash under load)."""
        while not stop.is_set():
            self.sup.poll()
            await asyncio.sleep(0.5)

    def _sample(self) -> None:
        while not self._stop.is_set():
            pid = self.pid()
            try:
                if pid is not None:
                    self.rss.append((time.perf_counter(), psutil.Process(pid).memory_info().rss / 2**20))
            except psutil.Error:
                pass  # between a death and its restart
            self._stop.wait(RSS_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()
        self.sup.stop()

    def log_tail(self, lines: int = 30) -> str:
        path = self.data_dir / "logs" / "gatekeeper.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    async def idle(self, bus: Bus) -> bool:
        """Nothing more can come out: no NATS submission waiting or in hand, no inbox file, no upload
        being received, no acceptance left unannounced (the sweep's work)."""
        from services.gatekeeper.duplicates import AcceptedIndex

        info = await bus.js.consumer_info("DATASETS", topology.GATEKEEPER.durable)
        if info.num_pending or info.num_ack_pending:
            return False
        own = self.data_dir / "gatekeeper"
        if any(p.is_file() for folder in (self.inbox, own / "uploads") for p in folder.rglob("*")):
            return False
        return not AcceptedIndex(own / "accepted").unannounced()


# ---------------------------------------------------------------------------- verdicts as they come


class Arrivals:
    """When each verdict event was first seen (core NATS), by submission name."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._waiting: dict[str, asyncio.Future] = {}

    async def listen(self, bus: Bus) -> None:
        for subject in ("dataset.accepted.*", topology.DATASET_REJECTED):
            await bus.nc.subscribe(subject, cb=self._on_verdict)

    async def _on_verdict(self, msg) -> None:
        name = msgspec.json.decode(msg.data).get("name", "")
        self.at.setdefault(name, time.perf_counter())
        if (waiting := self._waiting.pop(name, None)) is not None and not waiting.done():
            waiting.set_result(None)

    async def wait(self, name: str, timeout: float) -> float | None:
        """When `name`'s verdict came, or None after `timeout`."""
        if name not in self.at:
            waiting = self._waiting.setdefault(name, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiting), timeout)
            except TimeoutError:
                return None
        return self.at[name]


# ---------------------------------------------------------------------------- the clients


@dataclass
class Outcome:
    name: str
    channel: str
    started: float
    verdict_at: float | None = None
    reply: tuple[str, str] | None = None  # HTTP: (submission id, status)
    error: str = ""

    @property
    def latency(self) -> float | None:
        return None if self.verdict_at is None else self.verdict_at - self.started


@dataclass
class Run:
    """What the clients share: the stack, the verdicts seen, a staging folder, the progress bar."""

    stack: Stack
    arrivals: Arrivals
    nats_url: str
    staging: Path
    bar: tqdm
    outcomes: list[Outcome] = field(default_factory=list)


class Client:
    """One client: its own NATS connection and HTTP client, opened when its datasets need them."""

    def __init__(self, number: int, run: Run) -> None:
        self.number = number
        self.run = run
        self.bus: Bus | None = None
        self.http: httpx.AsyncClient | None = None

    async def submit_all(self, items: list[Planned]) -> None:
        try:
            for item in items:
                outcome = await self.submit(item)
                self.run.outcomes.append(outcome)
                if outcome.verdict_at is not None or outcome.error:
                    self.run.bar.update(1)
        finally:
            if self.bus is not None:
                await self.bus.close()
            if self.http is not None:
                await self.http.aclose()

    async def submit(self, item: Planned) -> Outcome:
        submit = {"nats": self._nats, "http": self._http, "inbox": self._inbox}[item.channel]
        outcome = Outcome(item.name, item.channel, time.perf_counter())
        try:
            await submit(item, outcome)
            if outcome.verdict_at is None and item.channel != "inbox":  # a dropped file is not waited for
                outcome.verdict_at = await self.run.arrivals.wait(item.name, VERDICT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - counted (no verdict seen), the client goes on
            outcome.error = repr(exc)
        return outcome

    async def _nats(self, item: Planned, outcome: Outcome) -> None:
        from flywheel.submit import submit_file

        if self.bus is None:
            self.bus = await Bus.connect([self.run.nats_url], f"load-client-{self.number}")
        if item.inline and item.raw is None:
            event = DatasetSubmitted(name=item.name, schema=item.schema, priority=item.priority,  # type: ignore[arg-type]
                                     level=item.level, rows=item.rows, submitted_by=f"load-{self.number}")  # type: ignore[arg-type]
            await self.bus.publish(topology.DATASET_SUBMITTED, event)
            return
        path = self.run.staging / f"{item.name}.jsonl"
        path.write_bytes(item.body())
        try:
            await submit_file(self.bus, self.run.stack.store, path, name=item.name, schema=item.schema,
                              priority=item.priority, level=item.level, wait_s=VERDICT_TIMEOUT_S)  # type: ignore[arg-type]
        finally:
            path.unlink()

    async def _http(self, item: Planned, outcome: Outcome) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(base_url=self.run.stack.url, timeout=VERDICT_TIMEOUT_S)
        params = {"name": item.name, "schema": item.schema, "priority": item.priority, "level": item.level,
                  "submitted_by": f"load-{self.number}"}
        if item.http_route == "/datasets/upload":
            reply = await self.http.post(item.http_route, params=params, files={"file": (f"{item.name}.jsonl", item.body())})
        else:
            reply = await self.http.post(item.http_route, params=params, content=item.body())
        outcome.verdict_at = time.perf_counter()
        if reply.status_code not in (200, 422):
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
        body = reply.json()
        outcome.reply = (body["submission_id"], body["status"])

    async def _inbox(self, item: Planned, outcome: Outcome) -> None:
        marks = "".join(f".{key}-{value}" for key, value, default in (
            ("level", item.level, "standard"), ("schema", item.schema, "chat_sft_v1")) if value != default)
        written = self.run.staging / f"{item.name}.inbox"
        written.write_bytes(item.body())
        folder = self.run.stack.inbox / item.priority
        folder.mkdir(exist_ok=True)
        outcome.started = time.perf_counter()
        os.replace(written, folder / f"{item.name}{marks}.jsonl")


async def submit_concurrently(run: Run, items: list[Planned], clients: int) -> float:
    """Client k submits items k, k + clients, ...; the seconds from the first submission to the last verdict."""
    started = time.perf_counter()
    await asyncio.gather(*(Client(k, run).submit_all(items[k::clients]) for k in range(clients)))

    async def verdict_of(outcome: Outcome) -> None:  # the files dropped without waiting
        outcome.verdict_at = await run.arrivals.wait(outcome.name, VERDICT_TIMEOUT_S)
        run.bar.update(1)

    await asyncio.gather(*(verdict_of(o) for o in run.outcomes if o.verdict_at is None and not o.error))
    ends = [o.verdict_at for o in run.outcomes if o.verdict_at is not None]
    return (max(ends) if ends else time.perf_counter()) - started


# ---------------------------------------------------------------------------- the audit


async def stream_verdicts(bus: Bus, store: ArtifactStore) -> list[Verdict]:
    """Every verdict message in the DATASETS stream, with its report's status."""
    from libs.common.history import read_history
    from services.gatekeeper.verdict import decode_report

    verdicts = []
    for record in await read_history(bus, ("dataset.accepted.*", topology.DATASET_REJECTED)):
        event = record.event
        if event is None:  # no event at all on a verdict subject: a verdict for nobody, counted as wrong
            verdicts.append(Verdict(f"undecodable message {record.seq}", "", "rejected", ""))
            continue
        try:
            report = decode_report(store.path_for(event.report_uri).read_bytes())
            status, duplicate_of = report.status, report.duplicate_of
            if report.submission_id != event.submission_id:
                status = f"report of {report.submission_id}"
        except Exception:  # noqa: BLE001 - an unreadable report is counted as a wrong verdict
            status, duplicate_of = "", ""
        accepted = isinstance(event, DatasetAccepted)
        verdicts.append(Verdict(
            name=event.name, submission_id=event.submission_id, event="accepted" if accepted else "rejected",
            report_status=status, dataset_id=event.dataset_id if accepted else "", duplicate_of=duplicate_of,
        ))
    return verdicts


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latencies(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    out = {}
    for channel in (*CHANNELS, "all"):
        values = [o.latency for o in outcomes if o.latency is not None and channel in (o.channel, "all")]
        out[channel] = {"n": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95)}
    return out


def rss_figures(samples: list[tuple[float, float]], start: float, end: float) -> tuple[float, float, float]:
    """(peak MB over the whole run, median MB in the load's first quarter, in its last quarter)."""
    quarter = (end - start) / 4
    first = [mb for t, mb in samples if start <= t <= start + quarter]
    last = [mb for t, mb in samples if end - quarter <= t <= end]
    peak = max((mb for _, mb in samples), default=0.0)
    return peak, statistics.median(first) if first else 0.0, statistics.median(last) if last else 0.0


def rss_by_tenth(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """The median RSS (MB) in each tenth of the load, to show whether it climbs with the datasets done."""
    tenth = (end - start) / 10
    out = []
    for k in range(10):
        inside = [mb for t, mb in samples if start + k * tenth <= t <= start + (k + 1) * tenth]
        out.append(round(statistics.median(inside)) if inside else float("nan"))
    return out


def cpu_note(cpu: tuple[float, float], seconds: float, datasets: int) -> str:
    """The CPU the gatekeeper and the clients' process used: per dataset, and as a share of one core."""
    gatekeeper, clients = cpu
    return (f"gatekeeper CPU {1000 * gatekeeper / datasets:.1f} ms a dataset ({gatekeeper / seconds:.0%} of a core), "
            f"the clients' process {clients / seconds:.0%} of a core")


def describe(audit_: Audit, what: str) -> str:
    f = audit_.figures()
    return (f"{what}: {audit_.submissions} submissions, {f['exactly_one']} with exactly one verdict; "
            f"{f['accepted']} accepted, {f['rejected']} rejected, {f['duplicate']} duplicates; "
            f"lost {len(audit_.lost)}, duplicated {audit_.duplicated}, wrong {f['wrong']}")


# ---------------------------------------------------------------------------- main


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def measure(args: argparse.Namespace, work: Path, base_model: Path) -> dict:
    channels = channel_split(args.clients, args.split)

    def channel_of(i: int) -> str:
        return channels[i % len(channels)]

    baseline = plan("one", args.baseline, lambda i: ("nats", "http")[i % 2], args.seed + 1)
    load = plan("load", args.datasets, channel_of, args.seed)
    kinds: dict[str, int] = {}
    for item in load:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    rows = sum(len(item.rows or ()) for item in load)
    print(f"{args.datasets} datasets ({rows:,} rows; {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) "
          f"from {args.clients} clients: {', '.join(f'{channels.count(c)} {c}' for c in CHANNELS)}; "
          f"baseline: one client, {args.baseline} datasets over NATS and HTTP", flush=True)

    stack = Stack(work / "data", base_model)
    staging = work / "staging"
    staging.mkdir()
    stop = asyncio.Event()
    try:
        ready_s = await stack.start()
        print(f"gatekeeper ready in {ready_s:.1f} s at {stack.url} (pid {stack.pid()}, "
              f"RSS {stack.rss[-1][1] if stack.rss else 0:.0f} MB), nats {stack.sup.nats_url}", flush=True)
        supervising = asyncio.create_task(stack.supervise(stop))
        bus = await Bus.connect([stack.sup.nats_url], "bench-load")
        try:
            arrivals = Arrivals()
            await arrivals.listen(bus)

            if stack.restarts:
                print(f"the gatekeeper restarted while starting:\n{stack.log_tail()}", flush=True)
            with tqdm(total=len(baseline), desc="one client", unit="dataset", mininterval=0.5) as bar:
                one = Run(stack, arrivals, stack.sup.nats_url, staging, bar)
                cpu = stack.cpu_s(), time.process_time()
                one_s = await submit_concurrently(one, baseline, 1)
                one_cpu = stack.cpu_s() - cpu[0], time.process_time() - cpu[1]
            one_rate = len(baseline) / one_s
            print(f"baseline: one client, {len(baseline)} datasets in {one_s:.1f} s: {one_rate:.1f} datasets/s; "
                  f"{cpu_note(one_cpu, one_s, len(baseline))}; so at most {one_s / max(one_cpu[0], 1e-9):.1f}x "
                  "with more clients, one core being the gatekeeper's limit", flush=True)

            with tqdm(total=len(load), desc=f"{args.clients} clients", unit="dataset", mininterval=0.5) as bar:
                many = Run(stack, arrivals, stack.sup.nats_url, staging, bar)
                cpu = stack.cpu_s(), time.process_time()
                load_start = time.perf_counter()
                load_s = await submit_concurrently(many, load, args.clients)
                load_cpu = stack.cpu_s() - cpu[0], time.process_time() - cpu[1]
            load_end = load_start + load_s
            rate = len(load) / load_s

            deadline = time.monotonic() + IDLE_TIMEOUT_S
            while not await stack.idle(bus):
                if time.monotonic() > deadline:
                    print(f"the gatekeeper was still busy {IDLE_TIMEOUT_S:.0f} s after the last verdict", flush=True)
                    break
                await asyncio.sleep(0.2)
            verdicts = await stream_verdicts(bus, stack.store)
        finally:
            stop.set()
            await supervising
            await bus.close()
        restarts = stack.restarts
        peak, first_q, last_q = rss_figures(stack.rss, load_start, load_end)
        reports = len(list((stack.store.root / "reports").glob("*.json")))
    finally:
        stack.stop()

    replies = {o.name: o.reply for o in one.outcomes + many.outcomes if o.reply is not None}
    checked = audit([i.expected() for i in baseline + load], verdicts, replies)
    load_only = audit([i.expected() for i in load], [v for v in verdicts if v.name.startswith("load-")], replies)
    if reports != len(baseline) + len(load):  # one report per submission, as the pipeline writes them
        checked.wrong.append(f"{reports} reports for {len(baseline) + len(load)} submissions")
    errors = [f"{o.name} ({o.channel}): {o.error}" for o in one.outcomes + many.outcomes if o.error]
    timing = latencies(many.outcomes)

    print(describe(load_only, "load"))
    print(describe(checked, "baseline and load"))
    print(f"reports written: {reports} for {len(baseline) + len(load)} submissions; gatekeeper restarts: {restarts}")
    for problem in (checked.wrong + [f"lost: {name}" for name in checked.lost] + errors)[:20]:
        print(f"  {problem}")
    print(f"load: {len(load)} datasets in {load_s:.1f} s: {rate:.1f} datasets/s ({rate / one_rate:.2f}x one client); "
          f"{cpu_note(load_cpu, load_s, len(load))}")
    for channel in (*CHANNELS, "all"):
        t = timing[channel]
        if t["n"]:
            print(f"  {channel:<6} {t['n']:>5} verdicts, submit to verdict p50 {t['p50']:.2f} s, p95 {t['p95']:.2f} s")
    print(f"gatekeeper RSS: peak {peak:.0f} MB; median {first_q:.0f} MB in the load's first quarter, "
          f"{last_q:.0f} MB in its last ({last_q - first_q:+.1f} MB); by tenth of the load: "
          f"{' '.join(str(mb) for mb in rss_by_tenth(stack.rss, load_start, load_end))} MB")

    figures = {
        "lost": len(checked.lost), "duplicated": checked.duplicated, "wrong_verdicts": len(checked.wrong),
        "gatekeeper_restarts": restarts, "gatekeeper_peak_rss_mb": peak, "rss_growth_mb": last_q - first_q,
        "vs_one_client": rate / one_rate,
    }
    at_most = ("lost", "duplicated", "wrong_verdicts", "gatekeeper_restarts", "gatekeeper_peak_rss_mb", "rss_growth_mb")
    met = {key: (figures[key] <= target if key in at_most else figures[key] >= target) for key, target in TARGETS.items()}
    return {
        "datasets": len(load),
        "clients": args.clients,
        "lost": len(checked.lost),
        "duplicated": checked.duplicated,
        "verdicts": checked.figures(),
        "datasets_per_s": rounded(rate, 2),
        "p95_verdict_s": {channel: rounded(timing[channel]["p95"]) for channel in (*CHANNELS, "all")},
        "gatekeeper_peak_rss_mb": rounded(peak, 1),
        "rss_growth_mb": rounded(last_q - first_q, 1),
        "vs_one_client": rounded(rate / one_rate, 2),
        "targets": TARGETS,
        "met": met,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--split", help="clients per channel: NATS,HTTP,inbox (default: about a third each)")
    parser.add_argument("--baseline", type=int, default=200, help="datasets the one-client baseline submits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="where the tiny model is created (default: a temporary folder)")
    parser.add_argument("--keep", type=Path, help="run the stack in this new folder and keep it (logs, stream, store)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.datasets < 1 or args.baseline < 1:
        raise SystemExit("--datasets, --clients and --baseline must be at least 1")
    channel_split(args.clients, args.split)  # a wrong --split fails before anything starts

    from libs.common.models import ensure_base_model

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True)
            work = args.keep.resolve()
        started = time.perf_counter()
        model = ensure_base_model(args.data_dir or work / "models-data")
        print(f"model {model} ready in {time.perf_counter() - started:.1f} s", flush=True)
        summary = asyncio.run(measure(args, work, model))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
