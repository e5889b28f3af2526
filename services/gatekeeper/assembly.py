"""A Gatekeeper put together from its settings: the service and `flywheel check` build it alike.

Both read the same data directory, so a check on the command line runs the same schemas,
limits and policy, the same tokenizer (the base model the trainer trains) and, at the deep
level, the same recently accepted datasets as the running service would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from libs.common.artifacts import ArtifactStore
from libs.common.models import ensure_base_model, load_tokenizer
from services.gatekeeper.index import AcceptedIndex
from services.gatekeeper.recent import RecentDatasets
from services.gatekeeper.settings import GatekeeperSettings
from services.gatekeeper.submissions import Gatekeeper
from services.gatekeeper.tokens import TokenCounter

NAME = "gatekeeper"


def token_counter_loader(settings: GatekeeperSettings) -> Callable[[], TokenCounter]:
    """The base model's tokenizer and chat template, loaded on first use, once (callable from any thread)."""
    lock = threading.Lock()
    loaded: list[TokenCounter] = []

    def load() -> TokenCounter:
        with lock:
            if not loaded:
                model = ensure_base_model(settings.data_dir, settings.base_model)
                loaded.append(TokenCounter(load_tokenizer(model)))
            return loaded[0]

    return load


def build_gatekeeper(settings: GatekeeperSettings) -> Gatekeeper:
    own = settings.service_dir(NAME)
    store = ArtifactStore(Path(settings.data_dir) / "artifacts")
    index = AcceptedIndex(own / "accepted")
    recent = RecentDatasets(index, store, own / "fingerprints", max_datasets=settings.recent_datasets,
                            max_rows=settings.recent_rows)
    return Gatekeeper(
        store, index, recent, config=settings.validation, max_error_fraction=settings.max_error_fraction,
        max_findings=settings.max_findings, tokens=token_counter_loader(settings),
    )
