"""Hard examples: fresh training problems a checkpoint gets wrong, turned into a practice dataset.

Each evaluation also asks the checkpoint `hard_probe_items` fresh problems at every level the
suite covers, drawn from each skill's TRAINING split with a seed derived from the checkpoint's
sha256 (a new checkpoint is probed on new problems; the same checkpoint always on the same
ones). A probe is never an item of the eval suite: the split is checked for every probe
(`probe_items` raises otherwise), so mining failures can never leak the suite into training.

The probes the checkpoint answered wrong, at the levels it has mostly learned (its suite
accuracy there at least `hard_examples_min_accuracy`), become one dataset of chat rows with the gold answer,
the row format of the curriculum's synthetic datasets (`{"messages": [user, assistant]}`), but
only when at least `hard_examples_min` were failed (no stream of tiny datasets). At a level the
model mostly fails, a failure says nothing the curriculum does not know: measured in
`bench.flywheel` with every failure submitted, an untrained model failed nearly every probe,
each evaluation sent back ~80 rows, and these runs of 12-16 steps came one after another, kept
the evaluator busy and took the level-1 accuracy from 0.075 down to 0.013-0.033. A probe whose
prompt alone fills max_length was not answered: it is no failure of the model and is left out.
The service writes the rows as an artifact and submits it through the gatekeeper like any
dataset (`dataset.submitted`, priority low, channel "hard-examples"); its id is derived from
what was probed, so a redelivered checkpoint republishes the same submission, which JetStream
drops as a duplicate.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import msgspec

from libs.common.artifacts import Artifact
from libs.common.events import DatasetSubmitted, derived_id
from libs.common.skills import SKILLS
from services.evaluator.scoring import ItemResult
from services.evaluator.suite import Suite, SuiteItem

CHANNEL = "hard-examples"
PRODUCER = "evaluator"


def probe_seed(checkpoint_sha256: str) -> int:
    """The probes' seed: a new one for every checkpoint, the same for one checkpoint."""
    return int(checkpoint_sha256[:16], 16)


def probe_items(suite: Suite, per_level: int, checkpoint_sha256: str) -> list[SuiteItem]:
    """`per_level` training-split problems at each level the suite covers, for this checkpoint.

    Raises ValueError if a probe belongs to the eval split or is an item of the suite: that
    would be a broken split, and the suite must never become training data.
    """
    if per_level == 0:
        return []
    seed = probe_seed(checkpoint_sha256)
    in_suite = {item.messages[0].content for item in suite.items}
    probes: list[SuiteItem] = []
    for name, levels in suite.levels().items():
        skill = SKILLS[name]
        for level in levels:
            for row in skill.generate(level, per_level, seed, split="train"):
                prompt = row["messages"][0]["content"]
                if skill.split_of(prompt) != "train" or prompt in in_suite:
                    raise ValueError(f"a {name} level {level} probe is an eval problem: the split is broken")
                probes.append(msgspec.convert(row, SuiteItem))
    return probes


def failed_rows(probes: Sequence[SuiteItem], results: Sequence[ItemResult], learned: Collection[str]) -> list[dict]:
    """Chat rows (with the gold answer) of the probes that were answered wrong at a `learned`
    level ("binary/1": one the checkpoint mostly solves)."""
    if len(probes) != len(results):
        raise ValueError(f"{len(results)} results for {len(probes)} probes")
    return [
        {"messages": msgspec.to_builtins(probe.messages)}
        for probe, result in zip(probes, results, strict=True)
        if result.answered and not result.correct and probe.level_key in learned
    ]


def learned_levels(accuracy: Mapping[str, float], min_accuracy: float) -> set[str]:
    """The levels ("binary/1") whose suite accuracy reached `min_accuracy`."""
    return {key for key, value in accuracy.items() if value >= min_accuracy}


def submission_id(checkpoint_sha256: str, levels: Mapping[str, list[int]], per_level: int) -> str:
    """The submission's id: the same for the same probes of the same checkpoint."""
    covered = ",".join(f"{name}{'.'.join(map(str, lvls))}" for name, lvls in sorted(levels.items()))
    return derived_id(PRODUCER, CHANNEL, checkpoint_sha256, covered, per_level)


def hard_examples_submission(event_id: str, checkpoint_sha256: str, rows: int, artifact: Artifact,
                             profile: str = "none") -> DatasetSubmitted:
    """The `dataset.submitted` for a hard-examples artifact of `rows` rows, under the data profile of
    the checkpoint that failed them: practice data trains in the format its model is asked in."""
    return DatasetSubmitted(
        id=event_id,
        name=f"{CHANNEL}-{checkpoint_sha256[:12]}-{rows}",
        priority="low",
        uri=artifact.uri,
        sha256=artifact.sha256,
        submitted_by=PRODUCER,
        channel=CHANNEL,
        profile=profile,
    )
