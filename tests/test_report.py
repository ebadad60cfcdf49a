"""`granite bench --ctx N` as a sweep, the rows' roofline figures, and the report as people read it
(numbers, plots, a self-contained report.html checked by a parser and, where one is installed, by a
real headless browser)."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from granite_cli.bench.spec import contexts
from granite_cli.render import number_text, percent_text
from tests.conftest import granite


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "r"
    r = granite("bench", "-m", "tiny-hybrid", "-m", "tiny-dense", "--ctx", "4k", "--batch", "1", "--gen", "4",
                "--reps", "1", "--warmup", "1", "--out", out, "-f", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), out, r.stderr


def test_one_context_is_the_sweep_up_to_it_and_fits(swept):
    res, _, err = swept
    ctxs = sorted({x["ctx"] for x in res["rows"]})
    assert ctxs == [512, 1024, 2048, 4096]
    assert "--ctx 4k is the sweep up to it" in err and "--ctx =4k runs that context alone" in err
    verdicts = "\n".join(res["verdicts"])
    assert "not enough points" not in verdicts
    assert "tiny-hybrid b1 prefill: " in verdicts and "tiny-dense b1 prefill: " in verdicts and "doubling" in verdicts


def test_exactly_one_context_and_lists_are_taken_as_written():
    assert contexts("=128k", gpu=False) == ([131072], False)
    assert contexts("128k", gpu=False) == ([512 * 2**i for i in range(9)], True)
    assert contexts("128k", gpu=True) == ([1024 * 2**i for i in range(8)], True)
    assert contexts("4k,8k", gpu=False) == ([4096, 8192], False)
    assert contexts("1k-4k*2", gpu=False) == ([1024, 2048, 4096], False)
    assert contexts("128k", gpu=False, widen=False) == ([131072], False)  # an endpoint's prompt length
    assert contexts("96k", gpu=False)[0][-3:] == [24576, 49152, 98304]   # ends at what was asked
    assert contexts("64", gpu=False)[0] == [16, 32, 64]  # below the start: still points to fit, none under 16
    r = granite("bench", "-m", "tiny-dense", "--ctx", "=256", "--batch", "1", "--gen", "2", "--phase", "prefill",
                "-f", "json")
    assert r.returncode == 0, r.stderr
    assert [x["ctx"] for x in json.loads(r.stdout)["rows"]] == [256]
    assert "sweep up to it" not in r.stderr


def test_rows_carry_rates_against_hand_counted_work(swept):
    res, _, _ = swept
    rows = {(x["model"], x["phase"], x["ctx"]): x for x in res["rows"]}
    # tiny-dense: 4 attention layers (D 64, 4 heads and 2 KV heads of 16), a dense MLP of width 128,
    # tied 256-token vocabulary, fp32. Projections per token: 4 x (64x128 + 64x64 + 3x128x64) = 147,456 MACs.
    proj = 4 * (64 * 128 + 64 * 64 + 3 * 128 * 64)
    d = rows[("tiny-dense", "decode", 512)]
    depth = 512 + 4 / 2  # the mean depth of the 4 timed steps
    assert d["work_flops"] == pytest.approx(2 * proj + 4 * 4 * depth * 4 * 16 + 2 * 64 * 256)
    params = 256 * 64 + proj + 4 * 2 * 64 + 64  # embedding (= the head), layers, norms
    assert d["work_bytes"] == pytest.approx(4 * params + 4 * (4 * 2 * 2 * 16) * depth)
    p = rows[("tiny-dense", "prefill", 512)]
    assert p["work_flops"] == pytest.approx(512 * (2 * proj + 4 * 2 * 512 * 64) + 2 * 64 * 256)
    for x in (d, p):
        assert x["achieved_tflops"] == pytest.approx(x["work_flops"] / x["median_s"] / 1e12)
        assert x["achieved_gbps"] == pytest.approx(x["work_bytes"] / x["median_s"] / 1e9)
        assert x["flops_frac"] == pytest.approx(x["achieved_tflops"] * 1e3 / x["ceiling_gflops"])
        assert x["bandwidth_frac"] == pytest.approx(x["achieved_gbps"] / x["ceiling_gbps"])
        assert 0 < x["flops_frac"] < 1.5 and x["ceiling_gflops"] > 0 and "probe" in x["ceiling_source"]
    # prefill does far more arithmetic per byte than a decode step
    assert p["intensity_flop_per_byte"] > 10 * d["intensity_flop_per_byte"]
    assert all(x["stdev_s"] is None for x in res["rows"])  # one repetition: no spread to report


def test_numbers_read_without_scientific_notation():
    assert number_text(1190980.4) == "1,190,980"
    assert number_text(78.94) == "78.9"
    assert number_text(4.5612) == "4.56"
    assert number_text(0.001234) == "0.00123"
    assert number_text(0) == "0" and number_text(None) == ""
    assert percent_text(0.3345) == "33.5%"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.fetches, self.images, self.tables, self.headings = [], [], [], 0, []
        self._h = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag in ("script", "img", "link", "iframe", "source", "video", "audio") and (a.get("src") or a.get("href")):
            url = a.get("src") or a.get("href")
            (self.images if url.startswith("data:image/png;base64,") else self.fetches).append(url)
        if tag == "table" and "sortable" in (a.get("class") or ""):
            self.tables += 1
        if tag in ("h1", "h2", "h3"):
            self._h = ""

    def handle_data(self, data):
        if self._h is not None:
            self._h += data

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._h is not None:
            self.headings.append(self._h)
            self._h = None


def test_report_html_is_self_contained_and_matches_the_markdown(swept):
    _, out, _ = swept
    md = (out / "report.md").read_text()
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.fetches == []  # nothing from the network, nothing from beside the file
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(page.images) == len(pngs) >= 5 and "roofline.png" in pngs and "attribution.png" in pngs
    for url in page.images:
        assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.tables == md.count("\n|---") and page.tables >= 1
    assert [h.strip() for h in page.headings] == [line.lstrip("#").strip().replace("`", "")
                                                  for line in md.splitlines() if line.startswith("#")]
    assert "e+0" not in md.split("## Results", 1)[1].split("##", 1)[0]  # the table has no scientific notation


def test_attribution_and_memory_plots_draw_every_part(swept):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from granite_cli.bench.report import _attribution_plot, _memory_plot, _series
    from granite_cli.bench.row import Row

    res, _, _ = swept
    rows = [Row.from_dict(x) for x in res["rows"]]
    fig = _attribution_plot(plt, rows)
    top, low = fig.axes
    # shares: every bar's parts add to 100%; the log panel has a bar of positive height for every part
    # the rows attribute time to (a small part is never hidden under the axis floor)
    att = sorted((x for x in res["rows"] if x["phase"] == "prefill"), key=lambda x: (x["model"], x["ctx"]))
    parts = [p for p in ("mamba", "attention", "moe_mlp", "rest") if any(x["attribution_s"].get(p) for x in att)]
    assert len(low.containers) == len(parts) >= 3 and low.get_yscale() == "log"
    for part, c in zip(parts, low.containers):
        for x, bar in zip(att, c.patches, strict=True):
            if x["attribution_s"].get(part, 0) > 0:
                assert bar.get_height() == pytest.approx(x["attribution_s"][part])
    heights = [sum(c.patches[i].get_height() for c in top.containers) for i in range(len(top.containers[0]))]
    assert all(h == pytest.approx(100) for h in heights)
    plt.close(fig)
    one = [r for r in rows if r.ctx == 4096]  # a single context: the predictions are still drawn
    fig = _memory_plot(plt, _series(one), _analysis(one))
    predicted = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert predicted and all(ln.get_marker() == "x" and len(ln.get_xdata()) == 1 for ln in predicted)
    plt.close(fig)


def _analysis(rows):
    from granite_cli.bench.analysis import analyse

    return analyse(rows)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt install chromium)")
def test_report_html_in_a_real_headless_browser(swept, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    _, out, _ = swept
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=args)
        page = browser.new_page()
        fetched = []
        page.on("request", lambda q: fetched.append(q.url) if not q.url.startswith(("file:", "data:")) else None)
        page.goto(Path(out / "report.html").as_uri())
        assert fetched == []
        # every embedded plot decoded and laid out
        sizes = page.eval_on_selector_all("img", "xs => xs.map(x => [x.complete, x.naturalWidth])")
        assert sizes and all(done and w > 100 for done, w in sizes)
        assert page.eval_on_selector_all("table", "ts => ts.every(t => t.dataset.sortable === 'ready')")
        # a click on the results table's ctx heading sorts its rows by context, numerically
        table = page.locator("table").filter(has=page.locator("th", has_text="phase")).first
        col = table.locator("thead th").all_inner_texts().index("ctx")
        table.locator("thead th").nth(col).click()
        cells = table.locator(f"tbody tr td:nth-child({col + 1})").all_inner_texts()
        nums = [int(c.replace(",", "")) for c in cells]
        assert nums == sorted(nums) and len(set(nums)) == 4
        table.locator("thead th").nth(col).click()
        again = [int(c.replace(",", "")) for c in table.locator(f"tbody tr td:nth-child({col + 1})").all_inner_texts()]
        assert again == sorted(nums, reverse=True)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
