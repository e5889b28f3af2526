"""The plot of `python -m bench.flywheel`: accuracy per level of every scored checkpoint (the
selection suite), and the champion's sealed-test accuracy, over the run's minutes. A PNG drawn with matplotlib (the `bench` extra:
`pip install -e '.[bench]'`); without it there is no plot and `plot` says so.
"""

from __future__ import annotations

from pathlib import Path

from bench.flywheel_figures import (
    Evaluation,
    LevelChange,
    Promotion,
    SealedScore,
    champion_tests_over_time,
)

# The champion's sealed-test levels drawn, each in its own style.
_CHAMPION_LEVELS = (("binary/1", "tab:green", "--"), ("binary/2", "tab:orange", "-."), ("binary/3", "tab:red", ":"))


def matplotlib_missing() -> str | None:
    """Why there can be no plot, or None when there can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    return None


def plot(path: Path, *, minutes: float, evaluations: list[Evaluation], promotions: list[Promotion],
         changes: list[LevelChange], tests: list[SealedScore] = ()) -> Path:
    """Draw the run into `path` (PNG) and return it; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (levels_ax, champion_ax) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)

    # Accuracy per level, each evaluation a point with its 95% interval as a band.
    keys = sorted({key for e in evaluations for key in e.levels}, key=_level_order)
    for key in keys:
        scored = [e for e in evaluations if key in e.levels]
        x = [e.t / 60 for e in scored]
        line, = levels_ax.plot(x, [e.levels[key].accuracy for e in scored], marker="o", markersize=3, label=key)
        levels_ax.fill_between(x, [e.levels[key].low for e in scored], [e.levels[key].high for e in scored],
                               color=line.get_color(), alpha=0.12, linewidth=0)
    for ax in (levels_ax, champion_ax):
        for change in changes:
            ax.axvline(change.t / 60, color="grey", linestyle=":", linewidth=1)
    for change in changes:
        levels_ax.annotate(f"{change.skill} {change.previous_level}\u2192{change.level}", (change.t / 60, 1.02),
                           fontsize=8, ha="center", annotation_clip=False)
    levels_ax.set_ylabel("accuracy (95% interval)")
    levels_ax.set_title("every scored checkpoint, per level (selection suite: it decides)", fontsize=10, pad=16)
    if keys:
        levels_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)

    # The champion on the sealed test: a step from each promotion to the next (or the end), the
    # whole test's interval as a band, and its accuracy at the first levels.
    reigns = champion_tests_over_time(promotions, list(tests))
    for i, (start, end, tested) in enumerate(reigns):
        x = [start / 60, min(end, minutes * 60) / 60]
        champion_ax.plot([start / 60], [tested.exact_match if tested else 0.0], "^", color="tab:blue", markersize=7)
        if tested is None:
            continue
        champion_ax.plot(x, [tested.exact_match] * 2, color="tab:blue", linewidth=2,
                         label="whole sealed test" if i == 0 else None)
        champion_ax.fill_between(x, [tested.exact_match_low] * 2, [tested.exact_match_high] * 2,
                                 color="tab:blue", alpha=0.15, linewidth=0)
        for key, color, style in _CHAMPION_LEVELS:
            if score := tested.levels.get(key):
                champion_ax.plot(x, [score.accuracy] * 2, color=color, linestyle=style,
                                 label=f"{key} (sealed test)" if i == 0 else None)
                champion_ax.fill_between(x, [score.low] * 2, [score.high] * 2, color=color, alpha=0.08, linewidth=0)
    champion_ax.set_ylabel("sealed-test accuracy (95% interval)")
    champion_ax.set_xlabel("minutes")
    champion_ax.set_title(f"the champion on the sealed test, which decides nothing ({len(promotions)} promotions, "
                          f"{sum(t is not None for _, _, t in reigns)} tested)", fontsize=10)
    champion_ax.legend(loc="upper left", fontsize=8)
    for ax in (levels_ax, champion_ax):
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0, max(minutes, 1e-3))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _level_order(key: str) -> tuple[str, int]:
    skill, _, level = key.partition("/")
    return skill, int(level) if level.isdigit() else 0
