"""The trial recorder: one row per trial, printed as a table at the end of the session.

Every trial says what fault it made, at what moment, what came of it, and the invariants over
the events it concerns: how many were lost, how many datasets were trained twice, how many
events were left unsettled, and whether the model served (and the champion record) was a
blessed checkpoint at every sample taken during it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from libs.common.bus import Bus
from libs.common.records import CHAMPION


@dataclass
class Trial:
    name: str
    fault: str
    moment: str = ""
    outcome: str = ""
    lost: int | None = None
    trained_twice: int | None = None
    unsettled: int | None = None
    served_blessed: str = ""
    passed: bool | None = None

    def cells(self) -> list[str]:
        def n(value: int | None) -> str:
            return "-" if value is None else str(value)

        verdict = {True: "ok", False: "FAIL", None: "?"}[self.passed]
        return [self.name, self.fault, self.moment, self.outcome, n(self.lost), n(self.trained_twice),
                n(self.unsettled), self.served_blessed, verdict]


HEADERS = ["trial", "fault", "moment", "outcome", "lost", "trained twice", "unsettled", "served blessed", ""]
_WIDTHS = [16, 34, 40, 70, 4, 7, 9, 14, 4]


@dataclass
class TrialTable:
    seed: int
    rows: list[Trial] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # When the stack stopped (the suite's end); None while it runs.
    ended: float | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, trial: Trial) -> Trial:
        self.rows.append(trial)
        return trial

    def render(self, *, clip: bool = True) -> str:
        lines = [f"fault suite: {len(self.rows)} trials, seed {self.seed} (FAULTS_SEED={self.seed} repeats the kill "
                 f"schedule), {(self.ended or time.monotonic()) - self.started:.0f} s"]
        table = [HEADERS, *(row.cells() for row in self.rows)]
        widths = [max(w, *(len(r[i]) for r in table)) if i < 3 or i > 3 else w for i, w in enumerate(_WIDTHS)]
        for i, row in enumerate(table):
            cells = [(_clip(c, widths[j]) if clip else c).ljust(widths[j]) for j, c in enumerate(row)]
            lines.append(" | ".join(cells).rstrip())
            if i == 0:
                lines.append("-+-".join("-" * w for w in widths))
        lines.extend(self.notes)
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(clip=False) + "\n")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------- the served model


@dataclass
class Sample:
    at: float
    served_sha256: str  # "" when inference did not answer
    served_source: str
    champion_sha256: str  # "" when no champion yet


class ServedWatch:
    """Samples every second what inference serves (/models/info) and the champion record (KV)."""

    def __init__(self, bus: Bus, inference_url: str, api_key: str, every_s: float = 1.0) -> None:
        self.bus = bus
        self.url = inference_url
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.every_s = every_s
        self.samples: list[Sample] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ServedWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        champion = await self.bus.record(CHAMPION)
        async with httpx.AsyncClient(headers=self.headers, timeout=2) as client:
            while True:
                served, source = "", ""
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = await client.get(f"{self.url}/models/info")
                    if response.status_code == 200:
                        info = response.json()
                        served, source = info.get("sha256", ""), info.get("source", "")
                current = ""
                with contextlib.suppress(Exception):  # NATS away (the restart trial): no sample
                    record, _ = await asyncio.wait_for(champion.read(), 2)
                    current = record.checkpoint_sha256 if record else ""
                self.samples.append(Sample(time.monotonic(), served, source, current))
                await asyncio.sleep(self.every_s)

    def verdict(self, blessed, *, never: set[str] = frozenset()) -> tuple[bool, str]:
        """Whether every sample served (and named as champion) a blessed checkpoint, never one of `never`.

        The base model served before any champion exists is the starting point, not a deployment.
        """
        served = [s for s in self.samples if s.served_sha256]
        bad = [s for s in served if not (blessed(s.served_sha256) or (s.served_source == "base" and not s.champion_sha256))
               or s.served_sha256 in never]
        bad += [s for s in self.samples if s.champion_sha256 and not blessed(s.champion_sha256)]
        text = f"{'yes' if not bad else 'NO'} ({len(served) - len(bad)}/{len(served)})"
        return not bad and bool(served), text
