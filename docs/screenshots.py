"""Screenshots of TensorBoard's dashboard for the README, taken in headless Chromium against a real server.

Starts `tensorboard --logdir LOGDIR` on a free port of 127.0.0.1 (from this Python environment), opens each tab in
headless Chromium driven by Selenium, waits until its charts or images have rendered (the page is a JavaScript app:
a plain `chromium --screenshot` can catch it half drawn), opens the first groups and saves, in OUT:
dashboard_scalars.png, dashboard_custom_scalars.png, dashboard_images.png and dashboard_timeseries.png.
The server and the browser are stopped on exit, failures included. A tab with nothing to show (Custom Scalars
before a layout is logged) is still saved, with a note.

Needs Chromium, its driver and Selenium: `sudo apt-get install chromium chromium-driver` and `pip install selenium`.
Run: python docs/screenshots.py --logdir out/logs --out docs/ [--tags REGEX] [--runs REGEX] [--tabs scalars images]
(or `make screenshots`, which runs the demo first when out/logs is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import quote, urlencode

# Tab: a CSS selector of what must have rendered. The older tabs keep their state in the URL fragment
# (`/#scalars&tagFilter=REGEX&regexInput=RUNS_REGEX`), Time Series in the query
# (`/?tagFilter=REGEX&runFilter=RUNS_REGEX#timeseries`).
TABS = {"scalars": "vz-line-chart2", "custom_scalars": "vz-line-chart2", "images": "tf-image-loader",
        "timeseries": "scalar-card, image-card"}  # fmt: skip
FLAGS = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
         "--disable-component-update --disable-sync --hide-scrollbars --force-device-scale-factor=1")  # fmt: skip
INSTALL = "needs Chromium, chromedriver, Selenium: sudo apt-get install chromium chromium-driver; pip install selenium"

# deep(selector): the elements matching it anywhere in the page, shadow DOM included (the tabs are web components).
DEEP = """const deep = (sel, root = document) => [...root.querySelectorAll(sel)].concat(
  ...[...root.querySelectorAll('*')].filter(e => e.shadowRoot).map(e => deep(sel, e.shadowRoot)));
"""
# What has rendered, how many spinners are shown, how many requests were made.
STATE = DEEP + (
    """const shown = e => e.offsetParent !== null && getComputedStyle(e).visibility !== 'hidden';
return [deep(arguments[0]).length, deep('paper-spinner-lite[active], mat-spinner').filter(shown).length,
  performance.getEntriesByType('resource').length];"""
)
# Open the first groups of the older tabs (the unnamed one is an empty search), close the settings pane of Time Series.
TIDY = DEEP + (
    """deep('tf-category-paginated-view').filter(view => view.category && view.category.name).slice(0, arguments[0])
  .forEach(view => { view.opened = true; });
deep('button[aria-label="Close side pane"]').forEach(button => button.click());"""
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    """The JSON answer of a URL of the server."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def start_tensorboard(logdir: pathlib.Path, log) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on a free port, its output to the file `log`; return the process and its address."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def wait_for_data(server: subprocess.Popen, base: str, timeout: float) -> dict:
    """Wait until the server lists runs and its scalar tags stop changing; return the plugins listing."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {server.returncode}")
        try:
            tags = get_json(base + "/data/plugin/scalars/tags") if get_json(base + "/data/runs") else None
        except OSError:
            tags = None
        if tags is not None and tags == last:
            return get_json(base + "/data/plugins_listing")
        last = tags
        time.sleep(1)
    raise RuntimeError(f"tensorboard at {base} served no data in {timeout:.0f} s (no runs in the log directory?)")


def start_browser(width: int, height: int):
    """Headless Chromium with a page of width x height pixels (device scale 1), driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in [*FLAGS.split(), f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
    return driver


def wait_rendered(driver, selector: str, timeout: float) -> bool:
    """Wait until `selector` matches, no spinner turns and no new request started for a second."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = driver.execute_script(STATE, selector)
        if state[0] and not state[1] and state == last:
            return True
        last = state
        time.sleep(1)
    return False


def tab_url(base: str, tab: str, tags: str, runs: str) -> str:
    """The address of a tab showing the tags and the runs that match the regular expressions `tags` and `runs`."""
    if tab == "timeseries":
        query = urlencode({k: v for k, v in (("tagFilter", tags), ("runFilter", runs)) if v}, quote_via=quote)
        return f"{base}/?{query}#timeseries"
    state = (("tagFilter", "" if tab == "custom_scalars" else tags), ("regexInput", runs))
    # No smoothing: the default 0.6 bends a size that steps from 6 to 48 into a ramp.
    return f"{base}/#{tab}" + "".join(f"&{k}={quote(v, safe='')}" for k, v in state if v) + "&_smoothingWeight=0"


def shoot(driver, base: str, tab: str, args, enabled: bool, path: pathlib.Path) -> None:
    """Open a tab, wait until it has rendered (unless TensorBoard has no data for it), save a screenshot to `path`."""
    driver.get(tab_url(base, tab, args.tags, args.runs))
    if not enabled:
        print(f"note: {tab}: TensorBoard has no data for this tab in {args.logdir}; saving it as it shows")
        time.sleep(3)
    else:
        rendered = wait_rendered(driver, TABS[tab], args.timeout)
        driver.execute_script(TIDY, args.groups)  # then wait for the charts of the groups it opened
        if not (rendered and wait_rendered(driver, TABS[tab], args.timeout)):
            print(f"warning: {tab}: not fully rendered after {args.timeout:.0f} s; saving it as it shows")
        time.sleep(1)  # the opening animation
    path.write_bytes(driver.get_screenshot_as_png())
    print(f"wrote {path}")


def main() -> int:
    """Parse the options, check the tools, take the screenshots; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=pathlib.Path, default=pathlib.Path("out/logs"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs"))
    parser.add_argument("--tabs", nargs="+", choices=list(TABS), default=list(TABS))
    parser.add_argument("--tags", default="", help="tag filter (a regular expression), e.g. '^rf/'")
    parser.add_argument("--runs", default="", help="run filter (a regular expression), e.g. 'deep'")
    parser.add_argument("--groups", type=int, default=3, help="how many tag groups to open in the older tabs")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server and each tab")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser or not shutil.which("chromedriver") or importlib.util.find_spec("selenium") is None:
        print(INSTALL, file=sys.stderr)
        return 2
    if not args.logdir.is_dir():
        print(f"no log directory {args.logdir}: run `make demo` first", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server and the browser
    server = driver = None
    with tempfile.TemporaryFile("w+") as log:
        try:
            server, base = start_tensorboard(args.logdir, log)
            plugins = wait_for_data(server, base, args.timeout)
            driver = start_browser(args.width, args.height)
            for tab in args.tabs:
                enabled = plugins.get(tab, {}).get("enabled", False)
                shoot(driver, base, tab, args, enabled, args.out / f"dashboard_{tab}.png")
            return 0
        except Exception as error:
            log.seek(0)
            print("tensorboard's output:\n" + log.read()[-3000:], file=sys.stderr)
            if not isinstance(error, RuntimeError):
                raise
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            if driver is not None:
                driver.quit()
            if server is not None:
                server.terminate()
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()


if __name__ == "__main__":
    sys.exit(main())
