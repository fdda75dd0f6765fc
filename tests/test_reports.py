"""Reports a reader can share (issue 11): figures inline in every executed notebook and HTML report, tables formatted
for people, no warnings or machine paths, no network resources; the landing page; and the same pages checked in
headless Chromium (every image loaded, no failed request, no console error, every link resolves)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from tokenbook.report import math_to_mathml, write_index
from tokenbook.results import format_value, style_table, to_markdown

NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ----------------------------------------------------------------------------------------------------------
# formatting rules (unit)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,column,shown", [
    (None, "ours", "n/a"), (float("nan"), "ours", "n/a"), (pd.NA, "x", "n/a"), (np.nan, "x", "n/a"),
    (22050660.0, "params", "22,050,660"), (22050660, "params", "22,050,660"), (12345.6, "x", "12,346"),
    (4.599123, "gmacs", "4.599"), (0.0493412, "diff", "0.04934"), (1000.0, "x", "1,000"), (3.0, "x", "3"),
    (True, "pass", "✓"), (False, "pass", "✗"), (np.bool_(True), "pass", "✓"), (True, "other", "True"),
    (1e-6, "tol", "1e-06"), (np.int64(4310222), "params", "4,310,222"), ("text", "source", "text"),
])
def test_format_value(value, column, shown):
    assert format_value(value, column) == shown


def test_markdown_and_styler_share_the_rules():
    df = pd.DataFrame({"model": ["a", "b"], "params": [2.205066e+07, np.nan], "pass": [True, None],
                       "paper_source": ["a long source " * 8, "n/a"]})
    md = to_markdown(df, "caption here")
    assert md.startswith("caption here\n") and "22,050,660" in md and "e+07" not in md and "nan" not in md.lower()
    assert "✓" in md and "n/a" in md
    html = style_table(df, "caption here").to_html()
    assert "<caption>caption here</caption>" in html and "22,050,660" in html and "nan" not in html.lower()
    assert "✓" in html and "#1a7f37" in html  # pass with colour
    assert "a long source a long source" in html and "…" not in html  # never cut
    assert 'class="row_heading' not in html  # no index column
    assert "white-space: normal" in html  # sources wrap


def test_math_becomes_mathml_outside_code():
    out = math_to_mathml("Energy $E = mc^2$ and `$not math$` and $$\\frac{a}{b}$$ costs $5 or $6.")
    assert out.count("<math") == 2 and "`$not math$`" in out and "$5 or $6" in out


# ----------------------------------------------------------------------------------------------------------
# every smoke report
# ----------------------------------------------------------------------------------------------------------
def _outputs(nb: dict):
    for cell in nb["cells"]:
        yield from cell.get("outputs", [])


@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_report_carries_figures_and_clean_tables(name, smoke_results):
    _, folder = smoke_results(name)
    meta = json.loads((folder / "meta.json").read_text())
    nb = json.loads((folder / f"{name}.ipynb").read_text())
    html = (folder / f"{name}.html").read_text()
    n_fig = len(meta["figures"])
    images = sum("image/png" in o.get("data", {}) for o in _outputs(nb))
    assert n_fig >= 1 and images >= n_fig, f"{images} image outputs for {n_fig} saved figures"
    assert len(re.findall(r"<img\b", html)) >= n_fig
    # no network resources; no stderr (library warnings) in the notebook; no home-folder paths
    assert not re.search(r"<script[^>]+src=[\"']?https?:", html), "a script loads from the network"
    assert not re.search(r"<link[^>]+href=[\"']?https?:", html), "a stylesheet loads from the network"
    assert "require.js" not in html and "MathJax.js" not in html
    stderr = ["".join(o.get("text", "")) for o in _outputs(nb) if o.get("name") == "stderr"]
    assert not stderr, f"stderr in the report: {stderr[:3]}"
    assert str(Path.home()) + "/" not in html, "an absolute path under the home folder is shown"
    assert "PosixPath(" not in html and "/.staging/" not in html and str(ROOT) not in html, "a machine path is shown"
    # tables for people: no NaN, no counts in scientific notation, no pandas truncation
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, flags=re.S)
    assert cells
    assert not [c for c in cells if c.strip() in ("nan", "NaN", "None", "<NA>", "NaT")]
    assert not [c for c in cells if re.fullmatch(r"\s*-?\d\.\d+e\+\d+\s*", c)], "scientific notation in a table"
    assert "dataframe" not in html  # every table went through the display helper, not a raw DataFrame repr
    assert "../../index-smoke.html" in html  # links back to its own profile's landing page


# ----------------------------------------------------------------------------------------------------------
# the site in a real browser
# ----------------------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-features=Translate,MediaRouter"]


def _check_page(page, url: str, site: Path) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="load")
    # every image finished (loaded or failed), or 20 s passed: then naturalWidth tells which ones loaded
    page.evaluate("() => Promise.race([new Promise(r => setTimeout(r, 20000)), Promise.all("
                  "Array.from(document.images).map(i => i.complete ? 1 : "
                  "new Promise(r => { i.onload = i.onerror = r; })))])")
    broken = page.evaluate("() => Array.from(document.images).filter(i => !(i.naturalWidth > 0))"
                           ".map(i => i.src.slice(0, 80))")
    problems += [f"image not loaded: {s}" for s in broken]
    ids = set(page.evaluate("() => Array.from(document.querySelectorAll('[id]')).map(e => e.id)"))
    for href in page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
        u = urlparse(href)
        if u.scheme == "file":
            target = Path(unquote(u.path))
            if not target.exists():
                problems.append(f"broken link: {href}")
            elif u.fragment and target == Path(unquote(urlparse(url).path)) and u.fragment not in ids:
                problems.append(f"broken anchor: {href}")
        elif u.scheme in ("http", "https"):  # a link out (a paper's arXiv page): never loaded, must be well-formed
            if not u.netloc or " " in href:
                problems.append(f"malformed external link: {href}")
        elif u.scheme not in ("data", "mailto"):
            problems.append(f"link of unknown kind: {href}")
    return problems


@pytest.mark.notebook
def test_site_in_headless_chromium(smoke_results, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; ./run_tests.sh installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e .[test])")
    folders = [smoke_results(n)[1] for n in NOTEBOOKS]
    site = folders[0].parents[1]
    write_index(site, ROOT, profile="smoke", notebooks=NOTEBOOKS)
    pages = [site / "index-smoke.html"] + [f / f"{f.parent.name}.html" for f in folders]
    index = (site / "index-smoke.html").read_text()
    for f in folders:  # the landing page shows figures and links every report
        assert f"{f.parent.name}/smoke/{f.parent.name}.html" in index
    assert index.count("<img") >= len(folders)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            problems = {}
            for page_path in pages:
                page = browser.new_page()
                got = _check_page(page, page_path.as_uri(), site)
                page.close()
                if got:
                    problems[page_path.name] = got
        finally:
            browser.close()
    assert not problems, json.dumps(problems, indent=1)[:4000]


# ----------------------------------------------------------------------------------------------------------
# interactive runs (outside the runner) never touch the committed results
# ----------------------------------------------------------------------------------------------------------
def _tiny_notebook(path: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell('profile: str = "cpu"  # profile\nresults_root: str = "results"  # where\n'
                                     'seed: int = 0  # seed\n')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    nbformat.write(nb, str(path))
    return path


def test_interactive_run_is_staged_into_a_scratch_folder(tmp_path, monkeypatch):
    from tokenbook.results import RunContext

    (tmp_path / "notebooks").mkdir()
    nb = _tiny_notebook(tmp_path / "notebooks" / "07_tiny.ipynb")
    (tmp_path / "results" / "07_tiny" / "cpu").mkdir(parents=True)
    committed = tmp_path / "results" / "07_tiny" / "cpu" / "meta.json"
    committed.write_text('{"committed": true}')
    monkeypatch.setenv("TOKENBOOK_ROOT", str(tmp_path))
    monkeypatch.delenv("TOKENBOOK_HEADLESS", raising=False)
    monkeypatch.delenv("TOKENBOOK_RESULTS_FOLDER", raising=False)
    ctx = RunContext.from_notebook("07_tiny", {"profile": "cpu", "results_root": "results", "seed": 0}, nb)
    assert ".staging" in ctx.out_dir.parts and ctx.where == "results/07_tiny/interactive"
    ctx.save_table("t", pd.DataFrame({"a": [1]}), caption="c")
    assert not (tmp_path / "results" / "07_tiny" / "interactive").exists()  # nothing visible before finish
    ctx.finish()
    final = tmp_path / "results" / "07_tiny" / "interactive"
    assert (final / "t.csv").is_file() and json.loads((final / "meta.json").read_text())["status"] == "completed"
    assert committed.read_text() == '{"committed": true}'  # the committed results are untouched
    assert not (tmp_path / "results" / ".staging").exists()
    # told otherwise: an explicit folder; under the runner: the runner's own staging folder is used as given
    monkeypatch.setenv("TOKENBOOK_RESULTS_FOLDER", "cpu-mine")
    ctx = RunContext.from_notebook("07_tiny", {"profile": "cpu", "results_root": "results", "seed": 0}, nb)
    ctx.finish()
    assert (tmp_path / "results" / "07_tiny" / "cpu-mine" / "meta.json").is_file()
    monkeypatch.setenv("TOKENBOOK_HEADLESS", "1")
    ctx = RunContext.from_notebook("07_tiny", {"profile": "cpu", "results_root": "results/.staging/x", "seed": 0}, nb)
    assert ctx.out_dir == tmp_path / "results" / ".staging" / "x" / "07_tiny" / "cpu"


def test_interactive_folders_are_git_ignored_and_lab_extra_has_widgets():
    import tomllib

    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "results/*/interactive/" in ignore and "results/.staging/" in ignore
    lab = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lab"]
    assert any(p.startswith("ipywidgets==") for p in lab)


def test_landing_page_is_headed_by_the_claims_ledger_when_there_is_one(tmp_path):
    from tokenbook.claims import Claim, Verdict

    site = tmp_path / "results"
    site.mkdir()
    write_index(site, ROOT)
    assert "No claims ledger for this profile yet" in (site / "index.html").read_text()
    rows = [Verdict(Claim(id="toe.lossless", paper="toe", statement="ToE is lossless", source="abstract [paper]",
                          kind="empirical"), "inconclusive", ours=-0.2, ci_low=-0.9, ci_high=0.5, n=3,
                    scale="Fashion-MNIST 28 px, 6 epochs").row()]
    pd.DataFrame(rows).to_csv(site / "claims.csv", index=False)
    write_index(site, ROOT)
    html = (site / "index.html").read_text()
    assert "ToE is lossless" in html and "inconclusive" in html and "#9a6700" in html and "Fashion-MNIST 28 px" in html


# ----------------------------------------------------------------------------------------------------------
# the claims ledger over the smoke runs (issue 12): every claim of every sheet, none failed
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.notebook
def test_smoke_runs_produce_a_ledger(smoke_results):
    from tokenbook import claims as C

    folders = [smoke_results(n)[1] for n in NOTEBOOKS]
    site = folders[0].parents[1]
    ledger = pd.read_csv(site / "claims-smoke.csv")  # the runner wrote it after each run (the smoke profile's own)
    assert list(ledger.columns) == list(C.LEDGER_COLUMNS)
    assert not (site / "claims.csv").exists() and not (site / "index.html").exists()  # the cpu profile's files
    stems = [n.split("_", 1)[1] for n in NOTEBOOKS]
    expected = {c.id for s in stems for c in C.load_claims(s)}
    assert set(ledger["claim"]) == expected and ledger["claim"].is_unique
    assert set(ledger["verdict"]) <= set(C.VERDICTS)
    # every notebook ran: a claim may be failed only by the failed-run rule (two smoke steps learn nothing, and the
    # floors of 01, 02 and 03 say so), never for want of evidence
    failed = ledger[ledger["verdict"] == "failed"]
    below = failed["detail"].astype(str).str.match(r"failed runs? below the (\w+ )?logistic-regression floor")
    assert below.all(), failed.loc[~below, ["claim", "detail"]].to_string()
    from_scratch = {c.id for s in ("t2t_vit", "seit", "cross_paper") for c in C.load_claims(s) if c.kind != "structural"}
    assert set(failed["claim"]) <= (from_scratch | {"toe.lossless"}
                                    | {"vittm.beats_vit", "vittm.linear_heads", "vittm.add_fusion",
                                       "vittm.no_memory_processing"})
    emp = ledger[ledger["kind"].isin(["empirical", "composition"]) & (ledger["verdict"] != "not_testable_here")
                 & (ledger["verdict"] != "failed")]
    timed = emp["method"].astype(str).str.contains("IQR")  # the compositions' speed-ups: interleaved timing
    assert set(emp.loc[timed, "claim"]) == {"cross_paper.toe_t2t_speedup", "cross_paper.toe_vittm_speedup"}
    assert (emp.loc[timed, "n"] == 1).all() and (emp.loc[~timed, "n"] >= 2).all(), emp[["claim", "n"]].to_string()
    exact = emp["method"].astype(str).str.startswith("largest |a − b|")  # exactness: the largest difference, no interval
    assert set(emp.loc[exact, "claim"]) == {"cross_paper.memory_t2t_exact"}
    assert emp.loc[exact, "ci_low"].isna().all() and emp.loc[exact, "criterion"].str.startswith("max |a − b|").all()
    assert emp.loc[~exact, "ci_low"].notna().all() and emp.loc[~exact, "ci_high"].notna().all()
    assert (emp["scale"].str.len() > 20).all()  # every row says what was run
    md = (site / "CLAIMS-smoke.md").read_text()
    assert all(c in md for c in expected)


def test_headline_table_takes_only_paper_vs_ours_tables(tmp_path):
    import json

    import pandas as pd

    from tokenbook.report import headline_table

    d = tmp_path / "06_x" / "cpu"
    d.mkdir(parents=True)
    pd.DataFrame({"model": ["A"], "metric": ["top1"], "paper": [80.0], "ours": [79.5], "diff": [-0.5],
                  "pass": [True]}).to_csv(d / "vs.csv", index=False)
    pd.DataFrame({"paper": ["x"], "claim": ["x.c"], "quantity": ["q"], "ours": [1.0],
                  "verdict": ["reproduced"]}).to_csv(d / "claims.csv", index=False)
    pd.DataFrame({"model": ["A"], "paper": ["ViTTM"], "top1": [50.0]}).to_csv(d / "comparison.csv", index=False)
    tables = [{"name": n, "csv": f"{n}.csv", "headline": True} for n in ("vs", "claims", "comparison")]
    (d / "meta.json").write_text(json.dumps({"tables": tables}))
    head = headline_table([{"name": "06_x", "dir": d, "meta": {"tables": tables}}])
    assert list(head["claim"]) == ["A · top1"]
    assert head["paper_value"].iloc[0] == 80.0 and head["ours"].iloc[0] == 79.5


# ----------------------------------------------------------------------------------------------------------
# the landing page as a dashboard (issue 21), built from the committed cpu results into a copy
# ----------------------------------------------------------------------------------------------------------
def test_forest_data_orients_every_claim_to_its_margin():
    from tokenbook.report import forest_data

    ledger = pd.DataFrame([
        {"paper": "x", "claim": "x.ge", "kind": "empirical", "quantity": "top-1 of a minus b (pt)", "ours": 1.0,
         "ci_low": 0.5, "ci_high": 1.5, "direction": ">=", "margin": -0.5, "verdict": "reproduced"},
        {"paper": "x", "claim": "x.le", "kind": "empirical", "quantity": "top-1 gap (pt)", "ours": 3.0,
         "ci_low": 2.0, "ci_high": 5.0, "direction": "<=", "margin": 4.0, "verdict": "inconclusive"},
        {"paper": "x", "claim": "x.within", "kind": "empirical", "quantity": "top-1 (pt)", "ours": -0.2,
         "ci_low": -0.6, "ci_high": 0.2, "direction": "within", "margin": 0.5, "verdict": "inconclusive"},
        {"paper": "x", "claim": "x.speed", "kind": "hardware", "quantity": "speed-up (x)", "ours": 2.0,
         "ci_low": 1.8, "ci_high": 2.2, "direction": ">=", "margin": 1.2, "verdict": "reproduced",
         "method": "median ratio, IQR of interleaved timing"},
        {"paper": "x", "claim": "x.exact", "kind": "structural", "quantity": "max |diff| (logits)", "ours": 0.0,
         "paper_value": 0.0, "verdict": "reproduced", "method": "|ours - paper| = 0 vs tolerance 0"},
        {"paper": "x", "claim": "x.nt", "kind": "empirical", "quantity": "ImageNet top-1 (%)", "ours": None,
         "verdict": "not_testable_here"},
    ])
    d = forest_data(ledger).set_index("claim")
    assert d.loc["x.ge", "panel"] == "difference (pt)" and d.loc["x.ge", "x"] == pytest.approx(1.5)
    assert (d.loc["x.ge", "lo"], d.loc["x.ge", "hi"]) == pytest.approx((1.0, 2.0))
    assert d.loc["x.le", "x"] == pytest.approx(1.0) and d.loc["x.le", "lo"] == pytest.approx(-1.0)  # mirrored
    assert d.loc["x.within", "x"] == pytest.approx(0.3) and d.loc["x.within", "lo"] == pytest.approx(-0.1)
    assert d.loc["x.within", "hi"] == pytest.approx(0.5)
    assert d.loc["x.speed", "panel"] == "ratio" and d.loc["x.speed", "x"] == pytest.approx(2.0 / 1.2)
    assert d.loc["x.exact", "panel"] == "structural" and bool(d.loc["x.exact", "exact"])
    assert d.loc["x.nt", "panel"] == "" and pd.isna(d.loc["x.nt", "x"])  # no marker, verdict as text


@pytest.fixture(scope="module")
def cpu_site(tmp_path_factory):
    """The committed cpu results copied to a temporary folder, their ledger and site rebuilt there."""
    from tokenbook.claims import build_ledger

    site = tmp_path_factory.mktemp("cpu_site") / "results"
    shutil.copytree(ROOT / "results", site)
    for f in ("index.html", "claims.csv", "CLAIMS.md", "README.md"):
        (site / f).unlink(missing_ok=True)
    build_ledger(site, NOTEBOOKS, "cpu")
    written = write_index(site, ROOT, profile="cpu", notebooks=NOTEBOOKS)
    assert set(written) == {"README.md", "forest.png", "forest.csv", "index.html"}
    return site


def test_dashboard_from_the_committed_results(cpu_site):
    html = (cpu_site / "index.html").read_text()
    assert "profile <code>cpu</code>" in html and "The committed results" in html
    assert 'src="forest.png"' in html and "forest.csv" in html and "Every claim against its margin" in html
    ledger = pd.read_csv(cpu_site / "claims.csv")
    forest = pd.read_csv(cpu_site / "forest.csv")
    assert list(forest["claim"]) == list(ledger["claim"])  # one row per claim, ledger order (grouped by paper)
    testable = ~ledger["verdict"].isin(["not_testable_here", "failed"])
    assert forest.loc[testable.values, "panel"].notna().all() and forest.loc[~testable.values, "panel"].isna().all()
    for n in NOTEBOOKS:
        assert f'id="sum-{n}"' in html


def test_dashboard_in_headless_chromium(cpu_site, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; ./run_tests.sh installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e .[test])")
    index = cpu_site / "index.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems = _check_page(page, index.as_uri(), cpu_site)
            forest = page.evaluate("() => { const i = document.querySelector('#forest img'); "
                                   "return i && {w: i.naturalWidth, top: i.getBoundingClientRect().top}; }")
            summary = page.evaluate("() => document.querySelector('#summary').getBoundingClientRect().bottom")
            meta = page.evaluate("() => document.querySelector('#run-meta').getBoundingClientRect().bottom")
            rows = page.evaluate("""() => Array.from(document.querySelectorAll('table.ledger tbody tr')).map(r => {
                const lh = parseFloat(getComputedStyle(r.querySelector('td')).lineHeight) || 16;
                return [r.querySelector('td:nth-child(1)').textContent, r.getBoundingClientRect().height / lh]; })""")
            page.screenshot(path=str(tmp_path / "landing.png"))
        finally:
            browser.close()
    assert not problems, json.dumps(problems, indent=1)[:4000]
    assert forest and forest["w"] > 0 and forest["top"] < 900, forest  # the forest plot loaded, above the fold
    assert summary <= 900 and meta <= 900, (summary, meta)  # the per-paper summary and metadata above the fold
    assert len(rows) == len(pd.read_csv(cpu_site / "claims.csv"))
    tall = [(c, round(h, 1)) for c, h in rows if h > 3.2]
    assert not tall, f"ledger rows taller than 3 lines: {tall}"
    assert (tmp_path / "landing.png").stat().st_size > 10_000
