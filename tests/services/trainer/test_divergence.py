"""Divergence: a non-finite or exploding loss stops the run for good, with the reason."""

from __future__ import annotations

import math

import pytest

from services.trainer.checkpoints import list_checkpoints, read_info
from services.trainer.divergence import Diverged, DivergenceGuard
from tests.services.trainer.samples import chat_rows
from tests.services.trainer.test_recipe import job_for, run_recipe


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_diverges_at_once(bad: float):
    with pytest.raises(Diverged, match="at step 1"):
        DivergenceGuard().check(1, bad)


def test_a_non_finite_gradient_norm_diverges():
    with pytest.raises(Diverged, match="gradient norm is nan"):
        DivergenceGuard().check(3, 0.5, math.nan)


def test_an_exploding_loss_diverges_and_a_learning_run_does_not():
    guard = DivergenceGuard(factor=20, warmup=5)
    for step, loss in enumerate([8.0, 4.0, 2.0, 1.0, 0.5, 0.4, 0.3], start=1):
        guard.check(step, loss)  # falling, as a learning run does
    guard.check(8, 2.5)  # a spike within 20x the moving average is noise, not divergence
    with pytest.raises(Diverged, match="exploded at step 9"):
        guard.check(9, 500.0)


def test_a_small_loss_never_explodes_however_small_its_average():
    guard = DivergenceGuard(factor=20, warmup=5)
    for step in range(1, 30):
        guard.check(step, 0.0007)  # all but memorised
    guard.check(30, 0.0144)  # 20x the average, still far below any diverging loss
    with pytest.raises(Diverged, match="exploded at step 31"):
        guard.check(31, 1.5)


def test_early_steps_may_be_anything_finite():
    guard = DivergenceGuard(factor=2, warmup=5)
    for step, loss in enumerate([1.0, 9.0, 30.0], start=1):
        guard.check(step, loss)


@pytest.mark.slow
def test_a_diverging_run_raises_and_leaves_no_final_checkpoint(make_settings):
    settings = make_settings(learning_rate=1e30, grad_clip=0.0, warmup_steps=0, epochs=3, save_every_steps=2)
    job, store = job_for(settings, chat_rows(32))
    with pytest.raises(Diverged):
        run_recipe(settings, job, store)
    # Whatever was saved before it diverged is intermediate: nothing final to score or promote.
    assert all(not read_info(path).final for _, path in list_checkpoints(job.run_dir))
