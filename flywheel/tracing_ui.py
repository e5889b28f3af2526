"""`flywheel up --tracing-ui phoenix`: Arize Phoenix beside the stack, as one more child process.

Phoenix (`make phoenix`: its own environment, `.venv-phoenix`) receives OTLP over HTTP on its UI port
(`/v1/traces`) and keeps spans in SQLite under `<data_dir>/phoenix`. `flywheel up` starts it
before the services, waits until it answers `/readyz`, points every service at it
(`OTEL_EXPORTER_OTLP_ENDPOINT`) and the dashboard's trace links at its page for a trace
(`/redirects/traces/<trace_id>`, which opens the trace in its project, "flywheel"), and stops it
after the services, so their last spans still reach it.

It listens on 127.0.0.1 only: Phoenix's UI has no login by default. Its OTLP/gRPC receiver,
which cannot be switched off, goes to a free port, so a collector or Jaeger on 4317 is left alone.
Phoenix lives in another environment than Flywheel's (it pulls ~100 packages and downgrades one
the lock pins): `--tracing-ui-python PATH` names that environment's python; without it, `make
phoenix`'s `.venv-phoenix` is used when there is one (`default_python`), else this interpreter.

The browser test (tests/services/dashboard/test_browser.py) runs the whole loop with Phoenix and
checks there that the dataset's trace holds every service's spans down to the "first answer"
(GET /v1/projects/flywheel/spans?trace_id=...) and that Phoenix's trace page shows them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from libs.common.process import terminate

TRACING_UIS = ("phoenix",)
PHOENIX_PORT = 6006
INSTALL_HINT = "make phoenix"
# `make phoenix` creates it, with a pinned Phoenix, in the repository (Makefile).
PHOENIX_VENV = ".venv-phoenix"
# The checkout the flywheel package is run from (`.venv/bin/flywheel` is an editable install of it);
# for a package installed into site-packages it is site-packages, which holds no PHOENIX_VENV.
CHECKOUT = Path(__file__).resolve().parents[1]
# Phoenix's first start creates its database (measured: 10 s on 2 cores); a busy machine is slower.
READY_TIMEOUT_S = 180.0
# Whether `phoenix.server.main` can be run by a python, without importing Phoenix (which takes seconds).
_INSTALLED = (
    "import importlib.util, pathlib, sys\n"
    "spec = importlib.util.find_spec('phoenix')\n"
    "places = spec.submodule_search_locations or () if spec else ()\n"
    "sys.exit(0 if any((pathlib.Path(p) / 'server' / 'main.py').is_file() for p in places) else 1)\n"
)


class TracingUiError(RuntimeError):
    """The tracing UI cannot run (not installed, port taken) or did not start. The message says what to do."""


def default_python(checkout: Path | None = None, cwd: Path | None = None) -> str:
    """Phoenix's python when none is named: `make phoenix`'s `.venv-phoenix` in the checkout Flywheel
    runs from, wherever `flywheel up` is started; else one in the working directory (an installed
    Flywheel, started where its `.venv-phoenix` was made); else this interpreter."""
    for base in (CHECKOUT if checkout is None else checkout, Path.cwd() if cwd is None else cwd):
        python = base / PHOENIX_VENV / "bin" / "python"
        # Not resolved: a venv's python is a link to the base interpreter, and only through the
        # venv's own path does it see the venv's packages.
        if python.is_file() and os.access(python, os.X_OK):
            return str(python)
    return sys.executable


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


class Phoenix:
    """Phoenix as a child process: `python -m phoenix.server.main serve` on 127.0.0.1:`port`."""

    name = "phoenix"

    def __init__(self, working_dir: Path, *, port: int = PHOENIX_PORT, python: str | None = None,
                 log_path: Path | None = None, host: str = "127.0.0.1") -> None:
        self.working_dir = Path(working_dir)
        self.port = port
        self.python = python or default_python()
        self.host = host
        self.log_path = log_path or self.working_dir / "phoenix.log"
        self.process: subprocess.Popen | None = None
        self.grpc_port = 0
        self._log_file = None

    # ------------------------------------------------------------------ what the stack gets

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def trace_url(self) -> str:
        """A trace's page: Phoenix redirects it to /projects/<project>/traces/<trace_id>."""
        return f"{self.url}/redirects/traces/{{trace_id}}"

    def exporting(self) -> dict[str, str]:
        """What every service's environment gets: spans to Phoenix, the dashboard's links to its pages."""
        # The OTLP/HTTP exporter appends /v1/traces, where Phoenix receives them.
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "FLYWHEEL_DASHBOARD_TRACE_URL": self.trace_url}

    # ------------------------------------------------------------------ lifecycle

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        # Phoenix's own OTel settings are not the stack's: it must not export its spans anywhere.
        env = {k: v for k, v in base.items() if not k.startswith("OTEL_")}
        env["PHOENIX_WORKING_DIR"] = str(self.working_dir)
        env.setdefault("PHOENIX_TELEMETRY_ENABLED", "false")
        env.setdefault("PHOENIX_ALLOW_EXTERNAL_RESOURCES", "false")
        return env

    def command(self) -> list[str]:
        return [self.python, "-m", "phoenix.server.main", "serve", "--host", self.host, "--port", str(self.port),
                "--grpc-port", str(self.grpc_port)]

    def installed(self, base: dict[str, str]) -> bool:
        """Whether `python` can run Phoenix (checked without importing it, which takes seconds)."""
        try:
            return subprocess.run([self.python, "-c", _INSTALLED], env=self.environment(base), timeout=60,
                                  check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def check(self, base: dict[str, str]) -> None:
        """Raise TracingUiError unless Phoenix can start: installed for `python`, its port free."""
        if not self.installed(base):
            where = "" if self.python == sys.executable else f" for {self.python}"
            raise TracingUiError(
                f"--tracing-ui phoenix: Arize Phoenix is not installed{where}. Install it with "
                f"`{INSTALL_HINT}` in the repository (its own environment, {PHOENIX_VENV}, which `flywheel up` then "
                f"uses), or name the python of an environment that has it with `--tracing-ui-python PATH`")
        if _port_taken(self.host, self.port):
            raise TracingUiError(f"--tracing-ui phoenix: port {self.port} on {self.host} is taken (another Phoenix?); "
                                 "choose another with --tracing-ui-port")

    def start(self, base: dict[str, str]) -> None:
        """Start Phoenix; `wait_ready` then waits for it."""
        self.working_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.grpc_port = _free_port(self.host)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.process = subprocess.Popen(self.command(), env=self.environment(base), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise TracingUiError(f"Phoenix exited with {code} while starting; see {self.log_path}:\n{self._tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TracingUiError(f"Phoenix did not answer {self.url}/readyz within {timeout_s:.0f} s; "
                                     f"see {self.log_path}")
            time.sleep(0.2)

    def exited(self) -> int | None:
        """Its exit code once it has stopped on its own; None while it runs (or was never started)."""
        return self.process.poll() if self.process else None

    def stop(self, timeout_s: float = 20.0) -> None:
        terminate(self.process, timeout_s)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def _tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def make_tracing_ui(name: str | None, data_dir: Path, *, port: int = PHOENIX_PORT,
                    python: str | None = None) -> Phoenix | None:
    """The tracing UI `flywheel up --tracing-ui NAME` starts (None: none)."""
    if not name:
        return None
    if name not in TRACING_UIS:
        raise TracingUiError(f"unknown tracing UI {name!r}; known: {', '.join(TRACING_UIS)}")
    return Phoenix(Path(data_dir) / "phoenix", port=port, python=python,
                   log_path=Path(data_dir) / "logs" / "phoenix.log")
