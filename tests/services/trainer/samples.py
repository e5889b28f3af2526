"""Datasets for the trainer tests, stored the way the gatekeeper stores accepted ones."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgspec

from libs.common.artifacts import ArtifactStore
from libs.common.events import DatasetAccepted, Priority


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Binary-to-decimal conversations: short, regular, learnable by the tiny model."""
    rng = random.Random(seed)
    circled = str.maketrans("01", "⓪①")
    rows = []
    for _ in range(n):
        value = rng.randrange(1, 256)
        binary = format(value, "b").translate(circled)
        rows.append({"messages": [
            {"role": "user", "content": f"Convert this binary number to decimal: {binary}"},
            {"role": "assistant", "content": f"todecimal {binary} = {value}"},
        ], "meta": {"source": "test"}})
    return rows


def write_dataset(
    data_dir: Path, rows: list[dict], *, name: str = "ds", priority: Priority = "normal", schema: str = "chat_sft_v1",
) -> DatasetAccepted:
    """Store `rows` as a dataset artifact the way the gatekeeper does and describe it as an event."""
    store = ArtifactStore(Path(data_dir) / "artifacts")
    lines = [msgspec.json.encode(row) + b"\n" for row in rows]
    dataset_id = hashlib.sha256(b"".join(lines)).hexdigest()
    artifact = store.write_lines(lines, "datasets", f"{dataset_id}.jsonl")
    return DatasetAccepted(
        dataset_id=dataset_id, name=name, uri=artifact.uri, sha256=artifact.sha256, schema=schema,
        priority=priority, num_rows=len(rows), num_rows_dropped=0, report_uri="", submission_id=f"sub-{name}",
    )
