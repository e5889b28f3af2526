"""Applying retention (services/trainer/retention.py) to the trainer's checkpoints.

Gathers what the decision needs: the checkpoints under `checkpoints/` (listed from disk), the
champion and its rollback targets (the `champion` KV record's history) and a staged deployment
(`deployment`), the evaluator's scores (every `eval.scored` the EVALS stream keeps: a few
hundred bytes an event, read only after a run finishes or the lease is taken), and what the
trainer resumes from (given by the service). Every deletion goes through
`ArtifactStore.discard`, which also removes a copy shared with other hosts. Only the lease
holder prunes: a standby never touches the checkpoints of the trainer it stands by for.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.history import read_subject
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.records import Champion, Deployment
from services.trainer.checkpoints import (
    TRAINING_STATE_DIR,
    TRAINING_STATE_FILE,
    list_checkpoints,
    parse_step,
    read_info,
    training_state_path,
)
from services.trainer.retention import Plan, Protection, StoredCheckpoint, decide, orphaned_states
from services.trainer.settings import TrainerSettings

log = get_logger("trainer.retention")


class _Score(msgspec.Struct):
    """What retention reads of an eval.scored event."""

    checkpoint_uri: str
    suite_version: str
    exact_match: float


def newest_suite_scores(scores: list[_Score]) -> dict[str, float]:
    """uri -> exact match on the newest suite version scored (events oldest first)."""
    if not scores:
        return {}
    newest = scores[-1].suite_version
    return {s.checkpoint_uri: s.exact_match for s in scores if s.suite_version == newest}


def scan(root: Path, uri_for: Callable[[Path], str]) -> tuple[list[StoredCheckpoint], dict[str, list[int]]]:
    """The checkpoints under `root` (checkpoints/), named as the store names them (the URIs the
    champion record and the scores use), and each run's training state files by step."""
    found: list[StoredCheckpoint] = []
    states: dict[str, list[int]] = {}
    if not root.is_dir():
        return found, states
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for step, path in list_checkpoints(run_dir):
            beside = training_state_path(path).is_file()
            inside = (path / TRAINING_STATE_FILE).is_file()
            found.append(StoredCheckpoint(run_id=run_dir.name, step=step, uri=uri_for(path),
                                          has_training_state=beside or inside, separable=not inside,
                                          final=_is_final(path)))
        state_dir = run_dir / TRAINING_STATE_DIR
        if state_dir.is_dir():
            states[run_dir.name] = sorted(
                step for p in state_dir.iterdir() if p.suffix == ".pt" and (step := parse_step(p.stem)) is not None)
    return found, states


def _is_final(path: Path) -> bool:
    try:
        return read_info(path).final
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return False  # not ours to judge: only the protections above keep it


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Pruner:
    def __init__(self, settings: TrainerSettings, store: ArtifactStore, bus: Bus, champion: Record[Champion],
                 deployment: Record[Deployment]) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.champion = champion
        self.deployment = deployment
        self.root = store.location("checkpoints")
        self._lock = asyncio.Lock()
        self.served: frozenset[str] = frozenset()
        self.scores: dict[str, float] = {}
        self.scored: frozenset[str] = frozenset()

    async def refresh(self) -> None:
        """Read the champion's history, a staged deployment and the evaluator's scores again."""
        history = await self.champion.history()
        deployment, _ = await self.deployment.read()
        staged = {deployment.candidate.checkpoint_uri} if deployment and deployment.state == "staged" else set()
        self.served = frozenset({c.checkpoint_uri for c in history} | staged)
        seen = await read_subject(self.bus, topology.EVAL_SCORED, decode=lambda data: msgspec.json.decode(data, type=_Score))
        events = [r.event for r in seen if r.event is not None]
        self.scores = newest_suite_scores(events)
        self.scored = frozenset(e.checkpoint_uri for e in events)

    async def prune(self, resume: set[str], pending_run: str | None, *, fresh: bool = False) -> Plan | None:
        """Apply retention now; `resume`: URIs kept whole; `pending_run`: the run in progress, if any.

        Returns the plan carried out (None when another pass was already running: it covers this one).
        """
        if self._lock.locked():
            return None
        async with self._lock:
            if fresh:
                await self.refresh()
            checkpoints, states = await asyncio.to_thread(scan, self.root, self.store.uri_for)
            s = self.settings
            plan = decide(checkpoints, Protection(resume=frozenset(resume), served=self.served, scores=self.scores,
                                                       scored=self.scored),
                          keep_last=s.keep_last_checkpoints, keep_best=s.keep_best_checkpoints, keep_runs=s.keep_runs)
            freed = 0
            for c in plan.delete:
                path = self.store.path_for(c.uri)
                freed += await asyncio.to_thread(_size, path)
                await self.store.discard(c.uri)
                log.info("checkpoint deleted", uri=c.uri, run_id=c.run_id, step=c.step)
            for c in [*plan.delete, *plan.drop_state]:
                state = training_state_path(self.store.path_for(c.uri))
                if state.is_file():
                    freed += state.stat().st_size
                    await self.store.discard(state.as_uri())
            by_run: dict[str, list[int]] = {}
            for c in plan.keep + plan.drop_state:
                by_run.setdefault(c.run_id, []).append(c.step)
            for run_id, steps in states.items():
                for step in orphaned_states(steps, by_run.get(run_id, []), in_progress=run_id == pending_run):
                    state = self.root / run_id / TRAINING_STATE_DIR / f"step-{step:08d}.pt"
                    if state.is_file():
                        freed += state.stat().st_size
                        await self.store.discard(state.as_uri())
            await asyncio.to_thread(self._drop_empty_runs, pending_run)
            if plan.delete or plan.drop_state or freed:
                log.info("retention applied", freed_bytes=freed, **plan.summary())
            return plan

    def _drop_empty_runs(self, pending_run: str | None) -> None:
        """Remove the folders of runs left with nothing (rmdir: only ever an empty folder)."""
        if not self.root.is_dir():
            return
        for run_dir in self.root.iterdir():
            if not run_dir.is_dir() or run_dir.name == pending_run:
                continue
            for folder in (run_dir / TRAINING_STATE_DIR, run_dir):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty (or gone): kept
