"""The viewer page in headless Chromium (Selenium + /usr/bin/chromedriver); skipped without them.

One server and one browser for the module (a page load is the slow part); each test loads its URL.
"""

from __future__ import annotations

import os
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

HEAT = "window.pathopeftViewer.world.getItemAt(1)"
CUR = "window.pathopeftState.cur"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # hundreds of tile GETs per test
            pass

    from pathopeft.viewer import create_app

    root = tmp_path_factory.mktemp("heat")
    make_export(root, task="tumor")
    make_export(root, task="tumor", slide_id="s2", seed=2, bag_probability=0.2, predicted_class="normal")
    # a second task of a continual model, same slide
    make_export(root, task="grade", invert=True, bag_probability=0.6, predicted_class="high")
    s3 = make_export(root, task="tumor", slide_id="s3", seed=3, bag_probability=0.5)
    (s3 / "s3.csv").unlink()  # exported with neither csv nor geojson: no tile scores at all
    (s3 / "s3.geojson").unlink()
    make_export(root, task="tumor", slide_id="s4", seed=4, bag_probability=0.7)
    (root / "s4.tiff").unlink()  # the slide moved after the export and no --slides says where
    srv = make_server("127.0.0.1", 0, create_app(root), threaded=True, request_handler=Quiet)
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
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,600"):
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
    raise AssertionError(f"page never reached: {what}: {d.execute_script('return location.href')}")


def open_page(d, url, slide="s1", task="tumor"):
    d.get(url)
    wait_for(
        d,
        f"const c = {CUR}; return c && c.slide_id === '{slide}' && c.task === '{task}'"
        " && window.pathopeftViewer.world.getItemCount() === 2"
        " && document.getElementById('regions').dataset.count !== undefined"
        " && document.getElementById('above').dataset.threshold !== undefined",
        f"{task}/{slide} open",
    )


def press(d, keys):
    """Type into whatever has focus (send_keys_to_element would click it: a click on the slide zooms)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(d, duration=10).send_keys(keys).perform()


def no_console_errors(d):
    """No SEVERE browser log entry since the last call (failed fetches and JS errors land there)."""
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def num(d, js):
    return float(d.execute_script("return " + js))


def test_page_layers_sliders_regions(server, driver, tmp_path):
    d = driver
    open_page(d, server + "?task=tumor&slide=s1")
    wait_for(
        d,
        f"return window.pathopeftViewer.world.getItemAt(0).getFullyLoaded() && {HEAT}.getFullyLoaded()",
        "tiles",
    )
    urls = d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name + ' ' + e.responseStatus)"
    )
    assert any("/slide_files/" in u and u.endswith(" 200") for u in urls), urls
    assert any("/heatmap_files/" in u and u.endswith(" 200") for u in urls), urls

    d.execute_script(
        "const o = document.getElementById('opacity'); o.value = 0.9; o.dispatchEvent(new Event('input'));"
    )
    assert num(d, f"{HEAT}.getOpacity()") == pytest.approx(0.9)

    def set_thr(v):
        d.execute_script(
            f"const t = document.getElementById('threshold'); t.value = {v};"
            " t.dispatchEvent(new Event('input'));"
        )
        wait_for(d, f"return Number(document.getElementById('above').dataset.threshold) === {v}", f"thr {v}")
        return d.execute_script(
            "const g = (id) => document.getElementById(id);"
            "return {above: g('above').innerHTML,"
            " regions: g('regions').querySelector('path').getAttribute('d'),"
            " kept: g('regions').dataset.kept, count: g('regions').dataset.count,"
            " below: g('regions').querySelectorAll('path.below').length};"
        )

    low, mid, high = set_thr(0.2), set_thr(0.5), set_thr(0.9)
    # the dashed outline follows the slider ...
    assert "<path" in low["above"] and "<path" in high["above"] and low["above"] != high["above"]
    # ... the exported region (one, max score 0.83) keeps its outline, faded once the slider passes its max
    assert low["regions"] == mid["regions"] == high["regions"] and low["count"] == high["count"] == "1"
    assert (low["kept"], low["below"], high["kept"], high["below"]) == ("1", 0, "0", 1)
    # at the export threshold the tile outline also has the lone high tile the export dropped
    assert mid["above"].count("<path") == 2
    assert "threshold=0.9" in d.current_url
    assert "t = 0.5 in s1.geojson" in d.find_element("id", "legend").text

    shot = tmp_path / "viewer.png"
    set_thr(0.5)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    artefacts = os.environ.get("PATHOPEFT_TEST_ARTIFACTS")  # CI keeps the screenshot when set
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artefacts) / "viewer.png")

    no_console_errors(d)


def test_keyboard_shortcuts(server, driver):
    from selenium.webdriver.common.by import By

    d = driver
    open_page(d, server + "?task=tumor&slide=s1")
    page = d.find_element(By.ID, "side").text
    for help_line in ("heatmap on/off", "heatmap opacity", "threshold − / +", "next / previous slide"):
        assert help_line in page
    press(d, "h")
    assert num(d, f"{HEAT}.getOpacity()") == 0
    press(d, "h")
    assert num(d, f"{HEAT}.getOpacity()") == pytest.approx(0.5)
    press(d, "]]")
    assert num(d, "document.getElementById('opacity').value") == pytest.approx(0.7)
    press(d, "[")
    assert num(d, f"{HEAT}.getOpacity()") == pytest.approx(0.6)
    press(d, "..")
    assert num(d, "document.getElementById('threshold').value") == pytest.approx(0.6)
    wait_for(d, "return Number(document.getElementById('above').dataset.threshold) === 0.6", "thr 0.6")
    press(d, ",")
    assert num(d, "document.getElementById('threshold').value") == pytest.approx(0.55)
    home = num(d, "window.pathopeftViewer.viewport.getHomeZoom()")
    assert num(d, "window.pathopeftViewer.viewport.getZoom()") == pytest.approx(home)  # none of those zoomed
    # with the slide canvas focused (as after a click on it), r toggles regions, not OpenSeadragon's
    # rotation, and OpenSeadragon keeps its own zoom key
    d.execute_script("document.querySelector('#osd .openseadragon-canvas').focus()")
    assert d.execute_script("return document.activeElement.classList.contains('openseadragon-canvas')")
    press(d, "r")
    assert d.execute_script("return document.getElementById('regions').dataset.count") == "0"
    assert num(d, "window.pathopeftViewer.viewport.getRotation()") == 0
    press(d, "rt=")
    assert d.execute_script("return document.getElementById('regions').dataset.count") == "1"
    assert d.execute_script("return document.getElementById('above').dataset.count") == "0"
    wait_for(d, f"return window.pathopeftViewer.viewport.getZoom() > {home * 1.05}", "OpenSeadragon's = zoom")
    press(d, "n")
    wait_for(d, f"return {CUR}.slide_id === 's2'", "next slide")
    press(d, "p")
    wait_for(d, f"return {CUR}.slide_id === 's1'", "previous slide")
    no_console_errors(d)


def hover_score(d, task):
    """Move the mouse over the view centre (the score peak of the tumor task) and read the score."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    osd = d.find_element(By.ID, "osd")
    d.execute_script("document.getElementById('score').dataset.task = ''")
    ActionChains(d, duration=10).move_to_element_with_offset(osd, 5, 5).perform()
    text = wait_for(
        d,
        f"const s = document.getElementById('score'); return s.dataset.task === '{task}'"
        " && s.textContent.match(/[0-9.]+$/) && s.textContent;",
        f"score of {task}",
    )
    return float(text.split()[-1])


def test_task_selector_switches_heatmap_and_keeps_the_view(server, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = driver
    open_page(d, server + "?task=tumor&slide=s1&x=0.5&y=0.375&z=2")
    assert "/api/tumor/s1/heatmap_files/" in d.execute_script(f"return {HEAT}.source.getTileUrl(3, 0, 0)")
    assert hover_score(d, "tumor") > 0.8
    Select(d.find_element(By.ID, "task")).select_by_value("grade")
    # the heatmap layer is replaced by the grade task's (its tile URLs), on the same slide
    wait_for(
        d,
        f"const h = {HEAT};"
        " return h && h.source.getTileUrl(3, 0, 0).includes('/api/grade/s1/heatmap_files/')",
        "grade heatmap layer",
    )
    assert "/api/grade/s1/slide_files/" in d.execute_script(
        "return window.pathopeftViewer.world.getItemAt(0).source.getTileUrl(3, 0, 0)"
    )
    wait_for(
        d,
        "return performance.getEntriesByType('resource')"
        ".some(e => e.name.includes('/api/grade/s1/heatmap_files/') && e.responseStatus === 200)",
        "a grade heatmap tile received",
    )
    assert hover_score(d, "grade") < 0.2  # the grade task's scores are the tumor task's inverted
    # same slide, same place: the view was carried over
    assert num(d, "window.pathopeftViewer.viewport.getZoom()") == pytest.approx(2, rel=1e-3)
    assert num(d, "window.pathopeftViewer.viewport.getCenter().x") == pytest.approx(0.5, abs=1e-3)
    assert "task=grade" in d.current_url and "slide=s1" in d.current_url
    no_console_errors(d)


def test_url_restores_slide_position_zoom_and_pan_updates_it(server, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = driver
    open_page(d, server + "?task=tumor&slide=s2&x=0.3&y=0.2&z=4&opacity=0.3&threshold=0.7", slide="s2")
    vp = "window.pathopeftViewer.viewport"
    assert num(d, f"{vp}.getCenter().x") == pytest.approx(0.3, abs=1e-3)
    assert num(d, f"{vp}.getCenter().y") == pytest.approx(0.2, abs=1e-3)
    assert num(d, f"{vp}.getZoom()") == pytest.approx(4, rel=1e-3)
    assert num(d, f"{HEAT}.getOpacity()") == pytest.approx(0.3)
    assert num(d, "document.getElementById('threshold').value") == pytest.approx(0.7)
    before = d.current_url
    osd = d.find_element(By.ID, "osd")
    drag = ActionChains(d, duration=50).move_to_element(osd).click_and_hold()
    drag.move_by_offset(-150, -100).release().perform()
    wait_for(d, f"return location.href !== {before!r}", "URL after pan")
    q = dict(p.split("=") for p in d.current_url.split("?", 1)[1].split("&"))
    assert (
        float(q["x"]) > 0.3
        and float(q["y"]) > 0.2
        and q["slide"] == "s2"
        and float(q["z"]) == pytest.approx(4)
    )
    assert float(q["x"]) == pytest.approx(num(d, f"{vp}.getCenter().x"), abs=1e-4)
    no_console_errors(d)


def rows(d):
    return d.execute_script(
        "return [...document.querySelectorAll('#slides tbody tr')].map(tr => tr.dataset.key)"
    )


def test_slide_list_sorts_by_the_clicked_header_and_keeps_it_in_the_url(server, driver):
    from selenium.webdriver.common.by import By

    d = driver
    open_page(d, server + "?task=tumor&slide=s1&sort=p&order=desc")  # restored from the URL
    by_p = ["tumor/s1", "tumor/s4", "grade/s1", "tumor/s3", "tumor/s2"]  # 0.9 0.7 0.6 0.5 0.2
    assert rows(d) == by_p
    d.find_element(By.CSS_SELECTOR, "#slides th[data-sort=p]").click()  # same header: reversed
    assert rows(d) == by_p[::-1]
    assert "sort=p&order=asc" in d.current_url
    d.find_element(By.CSS_SELECTOR, "#slides th[data-sort=task]").click()  # ties by slide id
    assert rows(d) == ["grade/s1", "tumor/s1", "tumor/s2", "tumor/s3", "tumor/s4"]
    assert d.execute_script(
        "return [...document.querySelectorAll('#slides th[aria-sort]')]"
        ".map(th => th.dataset.sort + ' ' + th.getAttribute('aria-sort'))"
    ) == ["task ascending"]
    assert "sort=task&order=asc" in d.current_url and "slide=s1" in d.current_url
    no_console_errors(d)


def test_missing_slide_and_export_without_tile_scores_are_explained(server, driver):
    d = driver
    d.get(server + "?task=tumor&slide=s4")
    wait_for(
        d, "return document.getElementById('error').textContent.includes('slide file not found')", "s4 error"
    )
    row = d.execute_script(
        "const tr = document.querySelector('#slides tr[data-key=\"tumor/s4\"]');"
        " return [tr.classList.contains('missing'), tr.title, window.pathopeftViewer.world.getItemCount()]"
    )
    assert row[0] and "s4.tiff' does not exist" in row[1] and row[2] == 0
    d.execute_script("document.querySelector('#slides tr[data-key=\"tumor/s3\"]').click()")
    note = wait_for(
        d,
        "const n = document.getElementById('abovenote').textContent;"
        " return window.pathopeftViewer.world.getItemCount() === 2"
        " && n.includes('need the tile scores') && n",
        "s3 note",
    )
    assert (
        "no s3.csv" in note and d.execute_script("return document.getElementById('error').textContent") == ""
    )
    no_console_errors(d)
