"""The stack the fault trials share: `flywheel up`'s supervisor over a temporary data directory.

One stack for the whole suite (starting six services that import torch takes most of a minute
on two cores): nats-server plus every service as a child process, restarted by the supervisor
when it dies, exactly as `flywheel up` runs them, with settings that make a dataset's whole
journey take seconds on the tiny model. The trainer's checkpoints live on a small tmpfs of
their own where mounting is permitted, so a trial can fill that disk; see `CheckpointDisk`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from flywheel.demo import free_port_base
from flywheel.supervisor import Supervisor

# Every service but the dashboard is killed by the trials; the dashboard (read-only) runs too,
# so a malformed event also meets the read model that follows every stream.
KILLED = ("gatekeeper", "trainer", "evaluator", "deployer", "inference", "curriculum")
SERVICES = (*KILLED, "dashboard")

# A dataset's journey in seconds: short runs that checkpoint every few steps (a kill mid-run
# resumes from one), a level-1 suite of 16 items with short answers, no hard-example probes,
# no synthetic data (the trials submit their own, so the stack can become quiet), a deployer
# that keeps every decision it makes, a staged deployment confirmed within a minute.
ENV = {
    "FLYWHEEL_MAX_LENGTH": "256",
    "FLYWHEEL_TORCH_THREADS": "1",
    "FLYWHEEL_TRAINER_EPOCHS": "1",
    "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "3",
    "FLYWHEEL_TRAINER_PROGRESS_EVERY_STEPS": "1",
    "FLYWHEEL_EVALUATOR_SUITE_MAX_LEVEL": "1",
    "FLYWHEEL_EVALUATOR_SYLLO_MAX_LEVEL": "0",
    "FLYWHEEL_EVALUATOR_ITEMS_PER_LEVEL": "16",
    "FLYWHEEL_EVALUATOR_MAX_NEW_TOKENS": "24",
    "FLYWHEEL_EVALUATOR_HARD_PROBE_ITEMS": "0",
    "FLYWHEEL_EVALUATOR_CHAMPION_CHECK_S": "2",
    "FLYWHEEL_CURRICULUM_ENABLED": "false",
    "FLYWHEEL_DEPLOYER_CONFIRM_TIMEOUT_S": "60",
    "FLYWHEEL_DEPLOYER_DECISIONS_KEPT": "1000",
    "FLYWHEEL_DASHBOARD_HEALTH_INTERVAL_S": "10",
}

CHECKPOINT_DISK_MB = 2048


class CheckpointDisk:
    """The folder the trainer writes checkpoints to, on a tmpfs of its own when mounting works.

    `mounted` says whether it is one; `why_not` says why not (e.g. no CAP_SYS_ADMIN in a
    container), and the full-disk trial then limits the trainer's file size instead.
    """

    def __init__(self, path: Path, size_mb: int = CHECKPOINT_DISK_MB) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        self.why_not = ""

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
                              capture_output=True, text=True, check=False)
        self.mounted = done.returncode == 0
        self.why_not = "" if self.mounted else (done.stderr.strip() or f"mount exited with {done.returncode}")

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize


class FaultStack:
    """A running stack, supervised by a thread of its own (the supervisor's `poll`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.checkpoints = CheckpointDisk(data_dir / "artifacts" / "checkpoints")
        self.sup = Supervisor(data_dir, port_base=free_port_base(len(SERVICES) + 1), services=SERVICES,
                              environ={**os.environ, **ENV}, grace_s=15)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="fault-stack-supervisor", daemon=True)
        self.started_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.checkpoints.mount()
        try:
            self.sup.start()
        except BaseException:
            self.checkpoints.unmount()
            raise
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for service in SERVICES:  # a trial that failed half-way may have left one stopped
            self.resume(service)
        self.sup.stop()
        self.checkpoints.unmount()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                self.sup.poll()

    # ------------------------------------------------------------------ addresses

    @property
    def nats_url(self) -> str:
        return self.sup.nats_url

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.sup.ports[service]}"

    @property
    def api_key(self) -> str:
        return (self.data_dir / "secrets" / "inference_api_key").read_text().strip()

    def log(self, service: str) -> str:
        return (self.data_dir / "logs" / f"{service}.log").read_text(errors="replace")

    # ------------------------------------------------------------------ processes

    def pid(self, service: str) -> int | None:
        with self._lock:
            child = self.sup.children[service]
            return child.process.pid if child.process is not None and child.process.poll() is None else None

    def restarts(self, service: str) -> int:
        with self._lock:
            return self.sup.children[service].restarts

    def kill(self, service: str) -> int | None:
        """kill -9 the service's process; its pid (None: it was not running)."""
        with self._lock:
            child = self.sup.children[service]
            if child.process is None or child.process.poll() is not None:
                return None
            os.kill(child.process.pid, signal.SIGKILL)
            return child.process.pid

    def kill_nats(self) -> int:
        """kill -9 the embedded nats-server; the supervisor restarts it on the same port and store."""
        with self._lock:
            process = self.sup.nats.process
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return process.pid

    @property
    def nats_restarts(self) -> int:
        with self._lock:
            return self.sup.nats_restarts

    def pause(self, service: str) -> None:
        """SIGSTOP: the process holds still (it takes no message) until `resume`."""
        if pid := self.pid(service):
            os.kill(pid, signal.SIGSTOP)

    def resume(self, service: str) -> None:
        if pid := self.pid(service):
            os.kill(pid, signal.SIGCONT)

    # ------------------------------------------------------------------ readiness

    def ready(self, service: str) -> bool:
        try:
            return httpx.get(f"{self.url(service)}/ready", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    async def aready(self, client: httpx.AsyncClient, service: str) -> bool:
        try:
            return (await client.get(f"{self.url(service)}/ready", timeout=3)).status_code == 200
        except httpx.HTTPError:
            return False
