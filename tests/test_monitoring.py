"""Live monitoring of a real search: per-trial TensorBoard event files and the Ray dashboard in a real
headless browser (Debian's chromium, driven over the Chrome DevTools Protocol).

One ``launch/search.py`` subprocess (its own local Ray with the dashboard) serves the whole module: the
browser test loads the dashboard URL the search prints while the search runs, with Ray's token
authentication on; the TensorBoard test reads the event files back once the search has ended.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_synthetic_dataset

from gankd_ray.data.sources.synthetic import SyntheticSpec

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
]
NAME = "monitored"
MAX_EPOCHS = 2
# The smallest search with GAN-KD trials: 16 train / 8 val images, a 1-epoch teacher, 2 trials of 2 epochs
# that ASHA never stops (grace period = max epochs), so every trial reports every epoch.
SEARCH_ARGS = [
    "--name",
    NAME,
    "--num-samples",
    "2",
    "--max-epochs",
    str(MAX_EPOCHS),
    "--grace-period",
    str(MAX_EPOCHS),
    "--teacher-epochs",
    "1",
    "optim.batch_size=8",
    "data.loader_workers=0",
]
URL_LINE = re.compile(r"Ray dashboard: (http://\S+)")
SEARCH_TIMEOUT_S = 600
PAGE_TIMEOUT_S = 90


class SearchProcess:
    """``launch/search.py`` running in the background; its merged output is collected line by line."""

    def __init__(self, workdir: Path, data: Path):
        self.experiment = workdir / "runs" / NAME
        self.lines: list[str] = []
        self.url_seen = threading.Event()
        self.url: str | None = None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "launch" / "search.py"),
                "--data",
                str(data),
                "--storage",
                "runs",
                *SEARCH_ARGS,
            ],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = URL_LINE.search(line)
            if match and self.url is None:
                self.url = match.group(1).rstrip("/")
                self.url_seen.set()
        self.url_seen.set()  # the process ended: wake a waiter even without a URL

    def tail(self, chars: int = 3000) -> str:
        return "".join(self.lines)[-chars:]

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        """SIGINT first: Tune and Ray shut down cleanly on it; kill only if that does not end it."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def chromium() -> Path:
    # Fail, not skip: .ci/run installs chromium, so its absence is a broken set-up, not an option.
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium "
            "(apt-get install --no-install-recommends chromium; .ci/run does it)"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("monitoring")
    data = make_synthetic_dataset(
        tmp / "data", SyntheticSpec(seed=1, num_train=16, num_val=8, num_test=8), rows_per_shard=8
    )
    running = SearchProcess(tmp, data)
    try:
        yield running
    finally:
        running.stop()


# --- Ray dashboard in a headless browser --------------------------------------------------------------


class DevToolsPage:
    """One browser tab driven over the Chrome DevTools Protocol (a websocket of JSON commands)."""

    def __init__(self, websocket):
        self._ws = websocket
        self._next_id = 0

    async def call(self, method: str, **params):
        self._next_id += 1
        call_id = self._next_id
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:  # skip events until our answer arrives
            message = await self._ws.receive_json(timeout=60)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for_text(self, needles: list[str], timeout: float, reload_every: float | None = None) -> str:
        """Poll the page text until it holds every needle; reload now and then for pages without refresh."""
        deadline = time.monotonic() + timeout
        last_reload = time.monotonic()
        while True:
            text = await self.text()
            if all(needle in text for needle in needles) or time.monotonic() > deadline:
                return text
            if reload_every and time.monotonic() - last_reload > reload_every:
                await self.call("Page.reload")
                last_reload = time.monotonic()
            await asyncio.sleep(1.0)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


async def _open_browser(chromium: Path, profile: Path):
    """Start headless chromium; returns (process, websocket URL of its first tab)."""
    import aiohttp

    proc = subprocess.Popen(
        [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"  # chromium writes its debugging port here
    deadline = time.monotonic() + 30
    while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{chromium} did not start (exit code {proc.poll()})")
        await asyncio.sleep(0.1)
    port = port_file.read_text().splitlines()[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
    return proc, next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


async def _visit_dashboard(chromium: Path, url: str, token: str, entrypoint_needle: str, out: Path) -> dict:
    """Log in the way the dashboard's own token box does, then read the Jobs and Actors pages."""
    import aiohttp

    seen: dict = {}
    with tempfile.TemporaryDirectory() as profile:
        proc, ws_url = await _open_browser(chromium, Path(profile))
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = DevToolsPage(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=f"{url}/#/jobs")
                seen["before_login"] = await page.wait_for_text(["Authentication Token Required"], PAGE_TIMEOUT_S)
                await page.screenshot(out / "dashboard_login.png")
                # What the token box sends: the server checks the token and sets an HttpOnly cookie.
                seen["login_status"] = await page.evaluate(
                    f"fetch('/api/authenticate', {{method: 'POST', headers: {{Authorization: 'Bearer {token}'}}}})"
                    ".then(r => r.status)"
                )
                await page.call("Page.reload")
                seen["jobs"] = await page.wait_for_text([entrypoint_needle, "RUNNING"], PAGE_TIMEOUT_S)
                seen["jobs_png"] = await page.screenshot(out / "dashboard_jobs.png")
                await page.call("Page.navigate", url=f"{url}/#/actors")
                seen["actors"] = await page.wait_for_text(
                    ["TrainController", "RayTrainWorker"], PAGE_TIMEOUT_S, reload_every=5
                )
                seen["actors_png"] = await page.screenshot(out / "dashboard_actors.png")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return seen


def _auth_token() -> str:
    """The token this machine's Ray uses (``ray get-auth-token`` follows Ray's own lookup order)."""
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.run(
        [str(ray_cli), "get-auth-token"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def test_dashboard_shows_the_search_in_a_browser(chromium, search, tmp_path):
    assert search.url_seen.wait(timeout=180) and search.url, f"no dashboard URL printed:\n{search.tail()}"
    assert search.url.startswith("http://127.0.0.1:"), search.url  # bound to localhost by default
    assert search.proc.poll() is None, f"the search ended before the browser looked:\n{search.tail()}"
    needle = "launch/search.py --data"  # the driver's entrypoint, as the Jobs page lists it
    seen = asyncio.run(_visit_dashboard(chromium, search.url, _auth_token(), needle, tmp_path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in ["dashboard_login.png", "dashboard_jobs.png", "dashboard_actors.png"]:
        shutil.copy(tmp_path / name, ARTIFACTS / name)
    # Token authentication is on: without the token the job is not shown.
    assert "Authentication Token Required" in seen["before_login"], seen["before_login"][-2000:]
    assert needle not in seen["before_login"]
    assert seen["login_status"] == 200
    assert needle in seen["jobs"] and f"--name {NAME}" in seen["jobs"], seen["jobs"][-3000:]
    assert "Authentication Token Required" not in seen["jobs"]
    assert "TrainController" in seen["actors"] and "RayTrainWorker" in seen["actors"], seen["actors"][-3000:]
    for png in [seen["jobs_png"], seen["actors_png"]]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png


# --- TensorBoard (after the browser test: it waits for the search to end) ---------------------------------


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of one TensorBoard event file, ``{tag: [(step, value), ...]}`` in file order.

    The file is a TFRecord stream (u64 length, u32 masked CRC of the length, payload, u32 masked CRC of
    the payload) of ``Event`` protos; tensorboardX ships both the proto and the CRC.
    """
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    blob, offset, scalars = path.read_bytes(), 0, {}
    while offset < len(blob):
        header = blob[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[offset + 8 : offset + 12])
        payload = blob[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", blob[offset + 12 + length : offset + 16 + length])
        assert header_crc == masked(header) and payload_crc == masked(payload), f"{path}: corrupt record"
        offset += 16 + length
        event = Event.FromString(payload)
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_files_per_trial(search):
    code = search.wait(timeout=SEARCH_TIMEOUT_S)
    assert code == 0, search.tail()
    epochs = pd.read_parquet(search.experiment / "epochs.parquet")
    reported = epochs.groupby("trial_id")["epoch"].apply(sorted).to_dict()
    assert len(reported) == 2, reported
    for trial_id, trial_epochs in reported.items():
        trial_dirs = list((search.experiment / "tune").glob(f"trial_driver_{trial_id}_*"))
        assert len(trial_dirs) == 1, (trial_id, trial_dirs)
        event_files = list(trial_dirs[0].glob("events.out.tfevents.*"))
        assert len(event_files) == 1, (trial_dirs[0], event_files)
        scalars = read_scalars(event_files[0])
        # Tune's TBXLoggerCallback prefixes every reported metric with ray/tune/ and keeps the '/' in names.
        adv = sorted(tag for tag in scalars if tag.startswith("ray/tune/kd/adv/"))
        disc = sorted(tag for tag in scalars if tag.startswith("ray/tune/disc/"))
        assert adv and disc, sorted(scalars)
        for tag in ["ray/tune/map", "ray/tune/ap50", "ray/tune/det/classification", adv[0], disc[0]]:
            steps = [step for step, _ in scalars.get(tag, [])]
            assert steps == list(range(1, len(trial_epochs) + 1)), (trial_id, tag, steps, trial_epochs)
        logged_map = [value for _, value in scalars["ray/tune/map"]]
        expected_map = epochs[epochs.trial_id == trial_id].sort_values("epoch")["map"].tolist()
        assert logged_map == pytest.approx(expected_map, abs=1e-6), (trial_id, logged_map, expected_map)
