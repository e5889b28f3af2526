"""Every service has the same shape: a newcomer finds the same things in the same files."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from libs.common.service import Service
from libs.common.settings import SERVICES

ROOT = Path(__file__).resolve().parents[2] / "services"


@pytest.mark.parametrize("name", SERVICES)
def test_service_folder_reads_like_its_row_in_the_design(name: str):
    folder = ROOT / name
    for module in ("__main__.py", "settings.py", "service.py", "api.py"):
        assert (folder / module).is_file(), f"services/{name}/{module} is missing"
    # __main__ only hands the declaration to the runtime.
    main = (folder / "__main__.py").read_text()
    assert f"from services.{name}.service import SERVICE" in main and "run(SERVICE)" in main

    settings = importlib.import_module(f"services.{name}.settings")
    service = importlib.import_module(f"services.{name}.service")
    api = importlib.import_module(f"services.{name}.api")
    declared = service.SERVICE
    assert isinstance(declared, Service) and declared.name == name
    assert declared.settings is settings.SETTINGS
    assert declared.routes is api.router, "routes come from api.router(service)"
    assert declared.subscriptions or declared.loops, "a service reacts to something"


@pytest.mark.parametrize("name", SERVICES)
def test_api_takes_a_narrow_interface_and_never_imports_the_service(name: str):
    tree = ast.parse((ROOT / name / "api.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert f"services.{name}.service" not in imported
    assert "TYPE_CHECKING" not in (ROOT / name / "api.py").read_text()


@pytest.mark.parametrize("name", SERVICES)
def test_settings_are_read_by_the_common_loader_only(name: str):
    """No service reads os.environ itself: every setting goes through libs.common.settings."""
    for path in (ROOT / name).rglob("*.py"):
        assert "os.environ" not in path.read_text() and "getenv" not in path.read_text(), path
