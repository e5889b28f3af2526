"""The environment the suite runs in is the locked one: generated files are checked against it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line):
            pins[match.group(1)] = match.group(2)
    return pins


def test_lock_pins_every_direct_dependency():
    pins = {re.sub(r"[-_.]+", "-", name).lower() for name in _pins()}
    for requirement in metadata.requires("flywheel") or []:
        if "extra ==" in requirement and not any(f'extra == "{e}"' in requirement for e in ("test", "bench")):
            continue
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()
        if name == "torch":
            continue  # installed first, on its own: requirements/torch.txt
        assert name in pins, f"{name} is a dependency but requirements/lock.txt does not pin it: run `make lock`"


def test_installed_versions_are_the_locked_ones():
    wrong = {}
    for name, pinned in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (pinned, "not installed")
            continue
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed packages differ from requirements/lock.txt (pinned, installed): {wrong}; run `make install`"
