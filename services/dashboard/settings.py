"""The dashboard's typed settings (env `FLYWHEEL_DASHBOARD_<FIELD>`, TOML section `[dashboard]`)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from libs.common.settings import SERVICES, CommonSettings, Positive, PositiveFloat, SettingsError


class DashboardSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Where a dataset's, run's or deployment's trace opens: `{trace_id}` is replaced. Empty: the
    # dashboard's own waterfall page (/traces/{trace_id}) from the local trace files. Jaeger:
    # http://localhost:16686/trace/{trace_id}; `flywheel up --tracing-ui phoenix` sets Phoenix's.
    trace_url: str = ""
    # Each service's base URL for its /health, e.g. {"trainer": "http://10.0.0.5:8102"}. A service
    # not named is looked for on `services_host` at its configured port (FLYWHEEL_<SERVICE>_HTTP_PORT).
    service_urls: dict[str, str] = msgspec.field(default_factory=dict)
    services_host: str = "127.0.0.1"
    health_interval_s: PositiveFloat = 5.0
    # The queue's consumer state is asked of NATS this often (JetStream has no push for it).
    queue_interval_s: PositiveFloat = 2.0
    # Live updates go out at most this often per browser: a burst of events is one update.
    push_interval_s: Annotated[float, msgspec.Meta(ge=0.05)] = 0.5
    # Points sent per curve and rows per table; older ones are thinned (curves) or dropped (tables).
    # Every live update resends the loss curve: 600 points draw it smoothly on a wide screen, and a
    # day of history's update is 60 kB instead of 250 kB with 2,000 points and the runs table
    # (`python -m bench.dashboard`).
    max_points: Positive = 600
    max_rows: Positive = 200

    def __post_init__(self) -> None:
        if self.trace_url and "{trace_id}" not in self.trace_url:
            raise SettingsError(f"trace_url: must contain {{trace_id}}, got {self.trace_url!r}")
        if unknown := sorted(set(self.service_urls) - set(SERVICES)):
            raise SettingsError(f"service_urls: no service named {unknown}; known: {', '.join(SERVICES)}")
        if bad := sorted(n for n, u in self.service_urls.items() if not u.startswith(("http://", "https://"))):
            raise SettingsError(f"service_urls: {bad} must be http:// or https:// URLs")


SETTINGS = DashboardSettings
