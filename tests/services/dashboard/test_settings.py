"""The dashboard's settings stop a wrong value with its variable's name."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.dashboard.settings import DashboardSettings


def test_settings_name_a_wrong_service_url_or_trace_template():
    def load(**env: str) -> DashboardSettings:
        return load_settings(DashboardSettings, "dashboard", {f"FLYWHEEL_DASHBOARD_{k}": v for k, v in env.items()})

    assert load(SERVICE_URLS='{"trainer": "http://t:8102"}').service_urls == {"trainer": "http://t:8102"}
    with pytest.raises(SettingsError, match="SERVICE_URLS.*trainr"):
        load(SERVICE_URLS='{"trainr": "http://t:8102"}')
    with pytest.raises(SettingsError, match="SERVICE_URLS.*must be http"):
        load(SERVICE_URLS='{"trainer": "t:8102"}')
    with pytest.raises(SettingsError, match="TRACE_URL.*trace_id"):
        load(TRACE_URL="http://localhost:16686/trace/")
