"""The dashboard in a real browser, while the whole loop runs.

Starts the stack the way `flywheel up` does (flywheel.supervisor.Supervisor: a nats-server and
every service, the dashboard included, as child processes, on free ports and a temporary data
directory, with a training run short enough for CI), opens the dashboard in Debian's headless
chromium through Selenium, drops a small Binary dataset into the gatekeeper's inbox and follows
the page as the panels fill: the dataset accepted, a run training with its loss curve growing,
a score, a promoted champion that inference serves and its sealed test figures, its lineage
naming the dataset. Every stage
is a screenshot (kept under pytest's tmp_path, and copied to $FLYWHEEL_SCREENSHOT_DIR when set);
the charts are checked on the pixels, not only on the DOM.

With Arize Phoenix (`make phoenix`: .venv-phoenix) the stack runs as `flywheel up --tracing-ui
phoenix` does, Phoenix on a free port. Once the champion is served, one chat completion makes it
give its first answer; then Phoenix must hold the dataset's trace with the spans of every service
of the journey, the gatekeeper's to inference's "first answer", and the dataset's trace link on the
dashboard must open Phoenix's page of that trace showing them (one more screenshot). Without
Phoenix that part is skipped (the test then reports skipped, saying the dashboard's part passed),
unless FLYWHEEL_REQUIRE_PHOENIX=1 (CI sets it), which makes a missing Phoenix a failure.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install chromium chromium-driver`;
FLYWHEEL_CHROMIUM / FLYWHEEL_CHROMEDRIVER name others). Without them it is skipped, unless
FLYWHEEL_REQUIRE_BROWSER=1 (CI sets it: .ci/run), which makes a missing browser a failure.
Selenium Manager never runs: the driver and the browser are given by path.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from flywheel.demo import free_port_base
from flywheel.supervisor import Supervisor
from flywheel.tracing_ui import Phoenix
from libs.common.tracing import read_trace

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "examples" / "binary_sample.jsonl"
SAMPLE_ROWS = sum(1 for line in SAMPLE.read_text().splitlines() if line.strip())
CHROMIUM = Path(os.environ.get("FLYWHEEL_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FLYWHEEL_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1600, 1000)
# Phoenix's trace page beside its project's table: wider, for a deep span tree and its details.
PHOENIX_WINDOW = (1920, 1080)
DATASET = "browser-binary"

# The loop cut to a browser test's budget (about two minutes on two cores): the sample (SAMPLE_ROWS
# rows) trained three epochs, only its final checkpoint saved and scored, on Binary level 1
# alone (48 items) without hard-example probes. The base model is not scored, so the trained
# checkpoint is the first champion: promoted by the deployer, confirmed served by inference.
# The curriculum writes no practice data (its datasets would train first), but still tracks
# levels: one evaluation at >= 2 % raises Binary's level, a level-change marker on the chart.
FAST = {
    "FLYWHEEL_TRAINER_EPOCHS": "3",
    "FLYWHEEL_TRAINER_BATCH_SIZE": "16",
    "FLYWHEEL_TRAINER_TORCH_THREADS": "1",
    "FLYWHEEL_MAX_LENGTH": "256",
    "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "1000",
    "FLYWHEEL_TRAINER_PROGRESS_EVERY_S": "1",
    "FLYWHEEL_EVALUATOR_SUITE_MAX_LEVEL": "1",
    "FLYWHEEL_EVALUATOR_SYLLO_MAX_LEVEL": "0",
    "FLYWHEEL_EVALUATOR_SCORE_BASE_MODEL": "false",
    "FLYWHEEL_EVALUATOR_HARD_PROBE_ITEMS": "0",
    "FLYWHEEL_CURRICULUM_ENABLED": "false",
    "FLYWHEEL_CURRICULUM_WINDOW": "1",
    "FLYWHEEL_CURRICULUM_THRESHOLD": "0.02",
    "FLYWHEEL_DASHBOARD_PUSH_INTERVAL_S": "0.25",
    "FLYWHEEL_DASHBOARD_QUEUE_INTERVAL_S": "1",
    "FLYWHEEL_DASHBOARD_HEALTH_INTERVAL_S": "2",
}

# Generous bounds for a busy two-core machine; each wait ends as soon as its condition holds.
READY_S = 240
STAGE_S = 300
# The services whose spans the dataset's trace holds, from its submission to the first answer.
JOURNEY = ("gatekeeper", "trainer", "evaluator", "deployer", "inference")


# ---------------------------------------------------------------------- the browser


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install {package})"
    return None


@pytest.fixture
def driver():
    if missing := _browser_missing():
        if os.environ.get("FLYWHEEL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FLYWHEEL_REQUIRE_BROWSER=1 but no browser: {missing}")
        pytest.skip(f"no headless browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        # The viewport itself 1600x1000, whatever the headless window's decorations take.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        yield browser
    finally:
        browser.quit()


# ---------------------------------------------------------------------- the stack


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def phoenix_missing() -> str | None:
    """Why Phoenix cannot run here (None: it can, from `make phoenix`'s .venv-phoenix or this python)."""
    probe = Phoenix(Path("unused"))  # the python `flywheel up --tracing-ui phoenix` would run it with
    if probe.installed(dict(os.environ)):
        return None
    missing = f"Arize Phoenix is not installed for {probe.python} (make phoenix)"
    if os.environ.get("FLYWHEEL_REQUIRE_PHOENIX") == "1":
        pytest.fail(f"FLYWHEEL_REQUIRE_PHOENIX=1 but {missing}")
    return missing


@pytest.fixture
def stack(tmp_path: Path, phoenix_missing: str | None) -> Iterator[Supervisor]:
    """The whole stack on free ports, supervised (a crashed child restarts) until the test ends;
    with Phoenix beside it, as `flywheel up --tracing-ui phoenix` runs it, where it is installed."""
    env = {**os.environ, **FAST}
    ui = {} if phoenix_missing else {"tracing_ui": "phoenix", "tracing_ui_port": _free_port()}
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), environ=env, **ui)
    sup.start()
    done = threading.Event()

    def supervise() -> None:
        while not done.wait(0.5):
            sup.poll()

    watcher = threading.Thread(target=supervise, name="supervise", daemon=True)
    watcher.start()
    try:
        yield sup
    finally:
        done.set()
        watcher.join()
        sup.stop()


def _log_tails(sup: Supervisor, lines: int = 15) -> str:
    out = []
    for path in sorted((sup.data_dir / "logs").glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(out)


# ---------------------------------------------------------------------- the page


class Page:
    """The dashboard in the browser: waits on its DOM, screenshots of each stage."""

    def __init__(self, driver, sup: Supervisor, shots: Path) -> None:
        self.driver = driver
        self.sup = sup
        self.shots = shots
        self.url = f"http://127.0.0.1:{sup.ports['dashboard']}/"
        shots.mkdir(parents=True, exist_ok=True)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def attr(self, selector: str, name: str) -> str:
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                       selector, name) or ""

    def number(self, selector: str, name: str) -> int:
        value = self.attr(selector, name)
        return int(value) if value.lstrip("-").isdigit() else 0

    def text(self, selector: str) -> str:
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", selector) or ""

    def until(self, what: str | Callable[[], str], condition: Callable[[], Any], timeout: float = STAGE_S) -> Any:
        """Poll `condition` (every half second) until it returns something truthy; return that.
        `what` is what was awaited, for the failure's message (a callable: computed then)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(lambda _driver: condition())
        except TimeoutException:
            self.screenshot("timeout")
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}\n"
                f"page:\n{self.text('main')[:3000]}\n\nlogs:\n{_log_tails(self.sup)}") from None

    def screenshot(self, name: str) -> Path:
        """The whole page (beyond the viewport; at least the viewport) as PNG, named for its stage."""
        width, height = self.js("const d = document.documentElement;"
                                "return [Math.max(d.scrollWidth, window.innerWidth), Math.max(d.scrollHeight, window.innerHeight)];")
        beyond = self.js("return [window.innerWidth, window.innerHeight];") != [width, height]
        # Only when there is more than the viewport: capturing beyond it lays the page out anew,
        # which scrolls panels of a full-window app such as Phoenix's.
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": beyond, "fromSurface": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        })
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        if target := os.environ.get("FLYWHEEL_SCREENSHOT_DIR"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    def rect(self, selector: str) -> tuple[float, float, float, float]:
        """An element's box in page coordinates (CSS pixels): x, y, width, height."""
        return tuple(self.js(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
            "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];", selector))

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


# ---------------------------------------------------------------------- pixels


def _crop(path: Path, box: tuple[float, float, float, float], page_width: float):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = image.width / page_width  # devicePixelRatio, as the capture applied it
    x, y, w, h = (round(v * scale) for v in box)
    return image.crop((x, y, x + w, y + h))


def _coloured(image) -> int:
    """Pixels of a strong colour: the plotted lines, points, interval caps and markers. The card
    (white), grid lines (light grey) and axis text (grey) are never counted."""
    rgb = np.asarray(image, dtype=np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def _changed(a, b) -> int:
    """Pixels that differ clearly between two crops of the same element."""
    if a.size != b.size:
        b = b.resize(a.size)
    difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2)
    return int((difference > 40).sum())


# ---------------------------------------------------------------------- the test


def _drop_into_inbox(sup: Supervisor, staging: Path) -> None:
    """The safe way in: written elsewhere, renamed into the inbox (priority high by its name)."""
    inbox = sup.data_dir / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / f"{DATASET}.priority-high.jsonl"
    shutil.copy(SAMPLE, staged)
    os.replace(staged, inbox / staged.name)


def test_the_dashboard_follows_one_dataset_through_the_loop(driver, stack: Supervisor, tmp_path: Path,
                                                            phoenix_missing: str | None):
    started = time.monotonic()
    sup = stack
    page = Page(driver, sup, tmp_path / "screenshots")
    print(f"\nscreenshots: {page.shots}")

    # ---- the empty state: connected, caught up, every service answering.
    def dashboard_up() -> bool:
        try:
            return httpx.get(page.url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + READY_S
    while not dashboard_up():
        assert time.monotonic() < deadline, f"the dashboard did not answer on {page.url}\n{_log_tails(sup)}"
        time.sleep(0.5)
    driver.get(page.url)
    page.until("the live stream", lambda: page.attr("#connection", "data-status") == "live", timeout=60)
    others = len(sup.services) - 1  # the dashboard checks every service but itself
    page.until("every service healthy on the page",
               lambda: page.number("#panel-services", "data-total") == others
               and page.number("#panel-services", "data-ok") == others, timeout=READY_S)
    page.until("the history replayed", lambda: page.attr("body", "data-caught-up") == "true", timeout=60)
    assert page.number("#panel-datasets", "data-count") == 0
    assert page.attr("#panel-champion", "data-sha256") == ""
    assert page.number("#chart-loss", "data-points") == 0
    assert page.attr("#panel-lineage", "data-loaded") == "none"
    assert set(page.js("return [...document.querySelectorAll('#panel-queue [data-queue]')].map(e => e.dataset.queue);")) \
        == {"gatekeeper", "trainer-high", "trainer-normal", "trainer-low"}
    empty = page.screenshot("01-empty")
    page_width = page.js("return document.documentElement.scrollWidth;")

    # ---- a dataset arrives: validated and accepted, with its row counts.
    _drop_into_inbox(sup, tmp_path / "staging")
    row = f'#panel-datasets tr[data-name="{DATASET}"]'
    state = page.until("the dataset accepted on the page",
                       lambda: page.attr(row, "data-state") in ("accepted", "training", "trained") and page.attr(row, "data-state"))
    assert str(SAMPLE_ROWS) in page.text(row), page.text(row)
    # Its links open: the validation report (through the dashboard) and the trace page.
    for link in (f"{row} a.report-link", f"{row} a.trace-link"):
        href = page.js("const a = document.querySelector(arguments[0]); return a ? a.href : '';", link)
        assert href, f"no {link} on the page"
        response = httpx.get(href, timeout=10)
        assert response.status_code == 200, f"{href}: {response.status_code} {response.text[:300]}"
    page.screenshot("02-accepted")
    print(f"accepted ({state}) after {time.monotonic() - started:.0f}s")

    # ---- it trains: the run on the page, the loss curve growing between two screenshots.
    page.until("a run training this dataset",
               lambda: page.attr("#panel-training", "data-state") == "running"
               and DATASET in page.text("#panel-training") and page.number("#chart-loss", "data-points") >= 3)
    first_points = page.number("#chart-loss", "data-points")
    training = page.screenshot("03-training")
    run_id = page.attr("#panel-training", "data-run-id")
    page.until("the loss curve to gain points",
               lambda: page.number("#chart-loss", "data-points") >= first_points + 3)
    later_points = page.number("#chart-loss", "data-points")
    page.screenshot("04-training-later")
    assert later_points > first_points
    assert page.number("#panel-training", "data-total-steps") > 0
    print(f"training {run_id}: {first_points} -> {later_points} loss points after {time.monotonic() - started:.0f}s")

    # ---- scored: a point per level on the accuracy chart, validation loss on the loss chart.
    page.until("a score on the accuracy chart", lambda: page.number("#chart-accuracy", "data-points") >= 1)
    page.until("the run's validation loss", lambda: page.number("#chart-loss", "data-val-points") >= 1)
    page.screenshot("05-scored")

    # ---- promoted: the champion panel names the trained checkpoint, and inference serves it.
    page.until("a promoted champion from this run",
               lambda: page.attr("#panel-champion", "data-run-id") == run_id and page.attr("#panel-champion", "data-sha256"))
    sha256 = page.attr("#panel-champion", "data-sha256")
    assert "first champion" in page.text("#panel-champion"), page.text("#panel-champion")
    page.until("a promotion marker on the accuracy chart", lambda: page.number("#chart-accuracy", "data-markers") >= 1)
    key = (sup.data_dir / "secrets" / "inference_api_key").read_text().strip()
    inference = f"http://127.0.0.1:{sup.ports['inference']}"
    headers = {"Authorization": f"Bearer {key}"}
    info = httpx.get(f"{inference}/models/info", headers=headers, timeout=10).json()
    assert info["sha256"] == sha256, f"inference serves {info}, the dashboard shows {sha256}"
    models = httpx.get(f"{inference}/v1/models", headers=headers, timeout=10)
    assert models.status_code == 200 and models.json()["data"], models.text
    assert sha256[:12] in page.text("header"), "the top bar names the served model"

    # ---- its figures: its score on the sealed test suite, with 95% intervals, once the evaluator tested it.
    page.until("the champion's sealed test on the page",
               lambda: page.attr("#panel-champion", "data-test-version").startswith("skills-test-"))
    champion = page.text("#panel-champion")
    assert "sealed test" in champion and "95%" in champion and "binary/1" in champion, champion
    assert page.js("return document.querySelectorAll('#panel-champion .test-levels tr[data-level]').length;") == 1
    assert "sealed test" in page.text("header") and "not yet tested" not in page.text("header")
    assert "selection accuracy" in page.text("#panel-accuracy").lower()  # the candidates' curves, labelled as such

    # ---- its lineage: fetched when the champion changed, naming the dataset it was trained on.
    page.until("the lineage of the served model",
               lambda: page.attr("#panel-lineage", "data-loaded") == "true" and page.attr("#panel-lineage", "data-model") == sha256)
    lineage = page.js("return document.querySelector('#panel-lineage .body').textContent;")
    assert DATASET in lineage, lineage[:2000]
    # The run has finished, its dataset is trained, the loss chart holds the whole run.
    page.until("the run finished and the dataset trained",
               lambda: page.attr(f'#panel-training tr[data-run-id="{run_id}"]', "data-state") == "finished"
               and page.attr(row, "data-state") == "trained")
    final = page.screenshot("06-final")

    # ---- the charts, on the pixels: drawn, and drawn anew between the stages.
    loss_box, accuracy_box = page.rect("#chart-loss"), page.rect("#chart-accuracy")
    loss = {name: _crop(path, loss_box, page_width) for name, path in (("empty", empty), ("training", training), ("final", final))}
    accuracy = {name: _crop(path, accuracy_box, page_width) for name, path in (("empty", empty), ("training", training), ("final", final))}
    counts = {f"loss {k}": _coloured(v) for k, v in loss.items()} | {f"accuracy {k}": _coloured(v) for k, v in accuracy.items()}
    changes = {"loss": _changed(loss["training"], loss["final"]), "accuracy": _changed(accuracy["training"], accuracy["final"])}
    print(f"coloured pixels: {counts}; changed from training to final: {changes}")
    # Each chart is a few hundred CSS pixels wide: a curve across it is several hundred coloured
    # pixels, the empty chart only its legend's swatches.
    assert counts["loss final"] > max(500, 3 * counts["loss empty"]), counts
    assert counts["loss training"] > counts["loss empty"], counts
    assert changes["loss"] > 300, changes  # the curve redrawn over the whole run, the validation point added
    assert counts["accuracy final"] > counts["accuracy training"] + 300, counts  # a point per level, the markers
    assert changes["accuracy"] > 300, changes

    errors = [m for m in page.console_errors() if "favicon" not in m]
    assert not errors, f"errors in the browser console: {errors}"
    print(f"the whole journey on the page took {time.monotonic() - started:.0f}s; screenshots in {page.shots}")

    # ---- the tracing UI: the dataset's whole journey as one trace in Phoenix.
    if sup.ui is None:
        pytest.skip(f"the dashboard's part passed; its trace in Phoenix was not checked: {phoenix_missing} "
                    "(FLYWHEEL_REQUIRE_PHOENIX=1 makes that a failure)")
    _the_datasets_trace_in_phoenix(page, row, inference, headers, sha256, started)


def _the_datasets_trace_in_phoenix(page: Page, row: str, inference: str, headers: dict[str, str], sha256: str,
                                   started: float) -> None:
    sup, driver = page.sup, page.driver
    phoenix = sup.ui
    link = f"{row} a.trace-link"
    # The dataset's trace: the dashboard's state names it, its link on the page goes to Phoenix.
    [dataset] = [d for d in httpx.get(f"{page.url}api/state", timeout=10).json()["datasets"] if d["name"] == DATASET]
    trace_id = dataset["trace_id"]
    href = page.js("return document.querySelector(arguments[0]).href;", link)
    assert href == phoenix.trace_url.format(trace_id=trace_id), (href, trace_id)

    # ---- the served model's first answer: recorded under its load, in the dataset's trace.
    reply = httpx.post(f"{inference}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "flywheel", "messages": [{"role": "user", "content": "What is 0b101 + 0b11 in binary?"}],
        "max_tokens": 16, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None, reply.text

    # ---- Phoenix holds the trace: every service's spans (the same span ids each recorded in its
    # local trace file), the first answer under the load of the checkpoint this dataset produced.
    def stored() -> list[dict]:
        spans, cursor = [], None
        while True:
            params: dict[str, Any] = {"trace_id": trace_id, "limit": 1000} | ({"cursor": cursor} if cursor else {})
            answer = httpx.get(f"{phoenix.url}/v1/projects/flywheel/spans", params=params, timeout=10)
            if answer.status_code == 404:  # no project yet: nothing received
                return []
            answer.raise_for_status()
            body = answer.json()
            spans += body["data"]
            if not (cursor := body.get("next_cursor")):
                return spans

    def journey() -> dict[str, Any] | None:
        spans = stored()
        recorded = {s["span_id"]: s["service"].removeprefix("flywheel-") for s in read_trace(sup.data_dir, trace_id)}
        services = {recorded.get(s["context"]["span_id"]) for s in spans}
        names = {s["name"] for s in spans}
        state.update(spans=len(spans), services=sorted(filter(None, services)), names=sorted(names))
        return state if set(JOURNEY) <= services and "first answer" in names else None

    state: dict[str, Any] = {}
    page.until(lambda: f"Phoenix to hold trace {trace_id} with spans of {', '.join(JOURNEY)} and the first answer; "
               f"it holds {state}", journey, timeout=120)
    spans = sorted(stored(), key=lambda s: s["start_time"])
    by_id = {s["context"]["span_id"]: s for s in spans}
    [first] = [s for s in spans if s["name"] == "first answer"]
    load = by_id[first["parent_id"]]
    assert load["name"] == "model load" and first["attributes"]["flywheel.checkpoint.sha256"] == sha256, (first, load)
    # What the page must name: each service's first span in the trace, and the first answer.
    recorded = {s["span_id"]: s["service"].removeprefix("flywheel-") for s in read_trace(sup.data_dir, trace_id)}
    shown = {service: next(s["name"] for s in spans if recorded.get(s["context"]["span_id"]) == service)
             for service in JOURNEY} | {"the end": "first answer"}
    print(f"Phoenix holds trace {trace_id}: {state['spans']} spans of {', '.join(state['services'])} "
          f"after {time.monotonic() - started:.0f}s; the page must show {shown}")

    # ---- the dataset's trace link on the dashboard opens Phoenix's page of that trace.
    before = set(driver.window_handles)
    driver.find_element("css selector", link).click()  # target=_blank: a new tab
    page.until("the trace link to open a tab", lambda: set(driver.window_handles) - before, timeout=30)
    [tab] = set(driver.window_handles) - before
    driver.switch_to.window(tab)
    # A new tab is a new target: its viewport is set anew.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": PHOENIX_WINDOW[0], "height": PHOENIX_WINDOW[1], "deviceScaleFactor": 1, "mobile": False})

    def body() -> str:
        return page.js("return document.body ? document.body.innerText : '';") or ""

    # /redirects/traces/<id> becomes the trace's page in its project: its spans as a tree, by name.
    page.until(lambda: f"Phoenix's page of trace {trace_id} (at {driver.current_url}) to show {sorted(set(shown.values()))}",
               lambda: f"/traces/{trace_id}" in driver.current_url and all(name in body() for name in shown.values()),
               timeout=90)
    # The journey's end selected: the first answer in view, its attributes beside the tree.
    [node] = driver.find_elements("xpath", "//*[normalize-space(text())='first answer']")
    # The tree is deep (submission -> ... -> model load -> first answer): its panel widened by
    # dragging the separator at its right edge, as one would, so that the names are not cut.
    separator = page.js("""
        let tree = arguments[0];
        while (tree && !(tree.scrollHeight > tree.clientHeight + 2)) tree = tree.parentElement;
        if (!tree) return null;
        const right = tree.getBoundingClientRect().right;
        return [...document.querySelectorAll('[role=separator]')].find((s) => {
            const r = s.getBoundingClientRect(); return r.height > r.width && Math.abs(r.left - right) < 12; }) || null;""",
        node)
    if separator is not None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(driver).click_and_hold(separator).move_by_offset(380, 0).release().perform()
    else:
        print("no separator beside Phoenix's span tree: its panel keeps its width")
    page.js("arguments[0].scrollIntoView({block: 'center'});", node)
    node.click()
    page.until("the first answer's attributes (the served checkpoint) beside the tree",
               lambda: body().count("first answer") >= 2 and sha256 in body(), timeout=30)
    [node] = driver.find_elements("xpath", "//*[normalize-space(text())='first answer']")[:1]
    top, bottom, height = page.js("const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom, window.innerHeight];",
                                  node)
    assert 0 <= top and bottom <= height, f"the first answer is not in view: {top}..{bottom} of {height}"
    shot = page.screenshot("07-trace-in-phoenix")
    text = body()
    assert all(name in text for name in shown.values()) and trace_id in text, text[:3000]

    # ---- on the pixels: a page drawn, not a blank one.
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    background = np.median(image.reshape(-1, 3), axis=0)
    drawn = float((np.abs(image - background).max(axis=2) > 40).mean())
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    print(f"Phoenix's trace page {shot}: {drawn:.1%} of the pixels drawn, {colours} colours; "
          f"{driver.current_url} after {time.monotonic() - started:.0f}s")
    assert drawn > 0.01 and colours > 50, (drawn, colours)
