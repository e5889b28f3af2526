"""The tokenization cache: a dataset's training examples as Arrow files, built once, memory-mapped.

A dataset is tokenized once per (dataset id, schema, profile, max_length, tokenizer and chat
template, encoder version): `cache_key`. The examples (input ids, labels, their row number)
go through `datasets.Dataset.from_generator`, which writes Arrow in chunks while the rows are
read line by line, so a large dataset never sits in memory as Python lists; the result is saved
under `<data_dir>/trainer/token-cache/<key>/` beside `flywheel-cache.json` (the rows dropped,
with their reasons). The directory is built aside and renamed into place: a directory with
that file is complete. Later runs, resumes and replays of the dataset load it memory-mapped
(`datasets.load_from_disk`) instead of tokenizing again.

The key is derived from content, not from file names: the dataset id is the sha256 of its
normalised rows, and the tokenizer's fingerprint hashes its serialized vocabulary and merges,
special tokens and chat template. A change to what `encode_chat` / `encode_text` produce must
bump `ENCODER_VERSION`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from libs.common.chat import EncodedChat

# Built aside as a checkpoint is, so checkpoints.remove_staging sweeps what a crash left half-built.
from services.trainer.checkpoints import STAGING_PREFIX

# Bump when encoding changes what it produces for the same rows (the cache would be stale).
ENCODER_VERSION = 1
META_FILE = "flywheel-cache.json"


class CacheMeta(msgspec.Struct, frozen=True):
    key: str
    num_rows: int  # rows read from the dataset file
    num_examples: int
    # (1-based row number, reason) of each row that cannot train.
    dropped: list[tuple[int, str]]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids or the rendered chat."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(tokenizer.chat_template or "").encode())
    digest.update(repr((tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token)).encode())
    return digest.hexdigest()


def cache_key(dataset_id: str, schema: str, profile: str, max_length: int, tokenizer_fp: str) -> str:
    identity = msgspec.json.encode({"dataset_id": dataset_id, "schema": schema, "profile": profile,
                                    "max_length": max_length, "tokenizer": tokenizer_fp, "encoder": ENCODER_VERSION})
    return hashlib.sha256(identity).hexdigest()[:32]


@dataclass(frozen=True)
class CachedExamples:
    """One dataset's examples, memory-mapped: `len(self)` of them, and the rows dropped."""

    table: object  # datasets.Dataset with columns input_ids, labels, row; None when no row trains
    meta: CacheMeta
    path: Path

    def __len__(self) -> int:
        return self.meta.num_examples

    def lengths(self):
        """Every example's token count (a numpy array), read from the Arrow offsets, not the data."""
        import numpy as np  # noqa: PLC0415
        import pyarrow.compute as pc  # noqa: PLC0415

        if self.table is None:
            return np.zeros(0, dtype=np.int64)
        return pc.list_value_length(self.table.data.column("input_ids")).to_numpy()

    def examples(self, indices: list[int]) -> list[EncodedChat]:
        columns = self.table[indices]
        return [EncodedChat(input_ids=ids, labels=labels)
                for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True)]


Encode = Callable[[object], "EncodedChat | str"]


def load_or_build(root: Path, key: str, rows: Callable[[], Iterable[object]], encode: Encode) -> tuple[CachedExamples, bool]:
    """The cached examples under `root/key`, building them first when missing; (examples, built).

    `rows()` yields the dataset's rows (row i of the file is the i-th); `encode(row)` returns its
    example or the reason it cannot train.
    """
    target = root / key
    if not (target / META_FILE).is_file():
        _build(target, key, rows, encode)
        built = True
    else:
        built = False
    return _load(target), built


def _load(target: Path) -> CachedExamples:
    import datasets  # noqa: PLC0415 - the trainer alone needs it

    meta = msgspec.json.decode((target / META_FILE).read_bytes(), type=CacheMeta)
    table = datasets.load_from_disk(str(target)) if meta.num_examples else None
    return CachedExamples(table=table, meta=meta, path=target)


def _build(target: Path, key: str, rows: Callable[[], Iterable[object]], encode: Encode) -> None:
    import datasets  # noqa: PLC0415

    datasets.disable_progress_bars()
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "row": datasets.Value("int64"),
    })
    dropped: list[tuple[int, str]] = []
    counted, kept = [0], [0]

    def generate():
        for number, row in enumerate(rows(), 1):
            counted[0] = number
            outcome = encode(row)
            if isinstance(outcome, str):
                dropped.append((number, outcome if len(outcome) <= 300 else outcome[:297] + "..."))
            else:
                kept[0] += 1
                yield {"input_ids": outcome.input_ids, "labels": outcome.labels, "row": number}

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{STAGING_PREFIX}{target.name}-"))
    try:
        scratch = staging / "generator-cache"
        final = staging / "examples"
        try:
            table = datasets.Dataset.from_generator(generate, features=features, cache_dir=str(scratch),
                                                    fingerprint=key)
            table.save_to_disk(str(final))
            del table
        except datasets.exceptions.DatasetGenerationError as exc:
            # The generator's own error (a malformed line is a DatasetError) is what the caller
            # must see, not the wrapper `datasets` puts around it.
            raise (exc.__cause__ or exc) from None
        except ValueError:
            if kept[0]:
                raise
            # No row can train: `datasets` refuses an empty generator. The verdict (every row
            # dropped, with its reason) is cached all the same, without a table.
            final.mkdir()
        meta = CacheMeta(key=key, num_rows=counted[0], num_examples=kept[0], dropped=dropped)
        (final / META_FILE).write_bytes(msgspec.json.encode(meta))
        if target.exists():  # a stray incomplete directory (no meta file): replace it
            shutil.rmtree(target)
        os.rename(final, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
