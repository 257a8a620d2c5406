"""The viewer page in headless Chromium (Selenium + /usr/bin/chromedriver); skipped without them."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.viewer_fixtures import make_export

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.skip("no chromium / chromedriver installed", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from werkzeug.serving import make_server

    from pathopeft.viewer import create_app

    root = tmp_path_factory.mktemp("heat")
    make_export(root, task="tumor")
    srv = make_server("127.0.0.1", 0, create_app(root), threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}/"
    srv.shutdown()


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def wait_for(d, js, what, tries=300):
    """Poll a JS condition (a bounded number of tries, not a wall-clock test limit)."""
    for _ in range(tries):
        v = d.execute_script(js)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"page never reached: {what}")


def test_page_layers_sliders_regions(server, driver, tmp_path):
    d = driver
    d.get(server)
    wait_for(
        d, "return window.pathopeftViewer && window.pathopeftViewer.world.getItemCount() === 2", "2 layers"
    )
    wait_for(
        d,
        "const w = window.pathopeftViewer.world; return w.getItemAt(0).getFullyLoaded()"
        " && w.getItemAt(1).getFullyLoaded();",
        "tiles loaded",
    )
    urls = d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name + ' ' + e.responseStatus)"
    )
    assert any("/slide_files/" in u and u.endswith(" 200") for u in urls), urls
    assert any("/heatmap_files/" in u and u.endswith(" 200") for u in urls), urls

    d.execute_script(
        "const o = document.getElementById('opacity'); o.value = 0.9; o.dispatchEvent(new Event('input'));"
    )
    assert d.execute_script("return window.pathopeftViewer.world.getItemAt(1).getOpacity()") == pytest.approx(
        0.9
    )

    def set_thr(v):
        d.execute_script(
            f"const t = document.getElementById('threshold'); t.value = {v};"
            " t.dispatchEvent(new Event('input'));"
        )
        wait_for(
            d, f"return Number(document.getElementById('regions').dataset.threshold) === {v}", f"thr {v}"
        )
        return d.execute_script("return document.getElementById('regions').innerHTML")

    low, high = set_thr(0.2), set_thr(0.6)
    assert "<path" in low and "<path" in high and low != high
    assert "threshold=0.6" in d.current_url

    shot = tmp_path / "viewer.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    notes = Path("/work/notes")
    if notes.is_dir():
        shutil.copy(shot, notes / "viewer.png")

    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
