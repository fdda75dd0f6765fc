"""Reports people read: the HTML report of each executed notebook and the results site (``results/index.html``,
the landing page, and ``results/README.md``).

- :func:`render_html`: nbconvert's lab template made self-contained (``templates/tokenbook_report``): code hidden,
  figures embedded as ``data:`` images, no script or font from the network (no require.js, MathJax, mermaid or
  widget CDNs), math in Markdown cells pre-rendered to MathML (``latex2mathml``) so it shows offline, and a bar that
  links back to the landing page.
- :func:`write_index`: the results site of one profile, from what is on disk: a landing page that is a dashboard
  (above the fold: one line per paper with its verdict counts and its report's key figure, the forest plot of every
  claim (:func:`write_forest`), the run's metadata; below: the full claims ledger with long texts folded, the
  headline tables, the runs table and every report, executed notebook and table), and the results README.

Results per profile: every profile owns its site files (:func:`tokenbook.io.site_file`). The committed ``cpu``
profile has the plain names ``results/index.html``, ``README.md``, ``claims.csv``, ``CLAIMS.md``, ``forest.png``,
``forest.csv``; any other profile ``p`` writes ``index-p.html``, ``README-p.md``, ``claims-p.csv``, ``CLAIMS-p.md``,
``forest-p.png``, ``forest-p.csv`` (git-ignored for smoke), so a run of one profile never rewrites another's. Each
landing page shows its own profile's runs and ledger, says which profile it is and links to the others present;
each report's home link goes to its own profile's landing page.

Static-site generators were considered and not used; the closing notes of issue 11 say why. Shared core: never
imports the paper code.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .io import NA, SITE_PROFILE, atomic_write, site_file, to_markdown
from .results import style_table

__all__ = ["TEMPLATES", "render_html", "math_to_mathml", "write_index", "collect_runs", "headline_table"]

TEMPLATES = Path(__file__).parent / "templates"

_DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE_MATH = re.compile(r"(?<![\\$\w])\$(?!\s)([^$\n]+?)(?<!\s)\$(?![\w$])")


def math_to_mathml(text: str) -> str:
    """Replace ``$$...$$`` and ``$...$`` LaTeX in Markdown by MathML (rendered by the browser, no script needed).
    Code spans and fenced blocks are left alone; a formula that does not convert stays as it was."""
    if "$" not in text:
        return text
    from latex2mathml.converter import convert

    def conv(m: re.Match, display: str) -> str:
        try:
            return convert(m.group(1).strip(), display=display)
        except Exception:  # keep the source text rather than lose it
            return m.group(0)

    parts = re.split(r"(```.*?```|`[^`\n]*`)", text, flags=re.S)
    for i in range(0, len(parts), 2):
        p = _DISPLAY_MATH.sub(lambda m: conv(m, "block"), parts[i])
        parts[i] = _INLINE_MATH.sub(lambda m: conv(m, "inline"), p)
    return "".join(parts)


def render_html(nb_path: Path, home: str = "../../index.html", meta_line: str = "") -> Optional[Path]:
    """``<notebook>.html`` beside an executed notebook: outputs only, self-contained, offline. A report that cannot
    render must not fail the run: the error is printed and ``None`` returned."""
    try:
        import nbformat
        from nbconvert import HTMLExporter

        nb = nbformat.read(str(nb_path), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = math_to_mathml(cell.source)
        exporter = HTMLExporter(template_name="tokenbook_report", extra_template_basedirs=[str(TEMPLATES)])
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        resources = {"tokenbook_home": home, "tokenbook_notebook": nb_path.name, "tokenbook_meta": meta_line}
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        return atomic_write(nb_path.with_suffix(".html"), body)
    except Exception as e:
        print(f"warning: HTML report for {nb_path.name} failed: {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------------------
# the results site
# ----------------------------------------------------------------------------------------------------------
def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _title(name: str) -> str:
    """The paper's title from its reference sheet (``references/<stem>.yaml``)."""
    from . import references

    stem = name.split("_", 1)[1] if "_" in name else name
    try:
        import yaml

        text = (Path(references.__file__).parent / f"{stem}.yaml").read_text()
        return str((yaml.safe_load(text) or {}).get("title") or "")
    except (OSError, ValueError, ImportError):
        return ""


def _device(meta: dict) -> str:
    d = meta.get("device", {}) or {}
    if d.get("gpu"):
        return f"{d['gpu']} x{d.get('gpu_count', 1)}"
    cpu = d.get("cpu_model") or d.get("cpu") or "?"
    return f"{cpu} ({d.get('cpu_count', '?')} cores, {d.get('torch_threads', '?')} torch threads)"


def collect_runs(results_dir: Path, notebooks: list[str], include_smoke: bool = False,
                 profile: Optional[str] = None) -> list[dict]:
    """One record per (notebook, profile) folder on disk: status, minutes, metadata, tables, figures. With
    ``profile``: only that profile's folders (``<profile>/`` and ``<profile>-failed/``), smoke or not."""
    runs = []
    for name in notebooks:
        nb_dir = results_dir / name
        if not nb_dir.is_dir():
            continue
        for pdir in sorted(p for p in nb_dir.iterdir() if p.is_dir()):
            folder = pdir.name
            if folder.endswith(".old") or folder == "interactive":
                continue
            if profile is not None:
                if folder not in (profile, f"{profile}-failed"):
                    continue
            elif folder.startswith("smoke") and not include_smoke:
                continue
            st, meta = _read_json(pdir / "status.json"), _read_json(pdir / "meta.json")
            if not st and not meta:
                continue
            runs.append({"name": name, "profile": folder, "dir": pdir, "status": st.get("status", "?"),
                         "minutes": st.get("minutes", "?"), "detail": st.get("detail", ""),
                         "finished": st.get("finished_utc", ""), "meta": meta,
                         "last_failure": _read_json(pdir / "last_failure.json")})
    return runs


def headline_table(runs: list[dict]) -> pd.DataFrame:
    """The rows of every table a notebook saved with ``headline=True``: claim, paper value + source, ours, pass.

    Only paper-vs-ours tables (an ``ours`` column) contribute; a claims verdict table (a ``verdict`` column, whose
    ``paper`` column names the sheet, not a number) is left out, since the claims ledger heads the site."""
    rows = []
    for r in runs:
        for t in r["meta"].get("tables", []):
            if not t.get("headline"):
                continue
            try:
                df = pd.read_csv(r["dir"] / t["csv"])
            except (OSError, ValueError):
                continue
            if "ours" not in df.columns or "verdict" in df.columns:
                continue
            for _, row in df.iterrows():
                get = row.get
                subject = next((c for c in ("model", "pair", "quantity", "task") if c in row.index), None)
                claim = " · ".join(str(get(c)) for c in (subject, "what", "metric")
                                   if c and c in row.index and not pd.isna(get(c)))
                rows.append({"paper": r["name"], "claim": claim or t.get("caption", t["name"]),
                             "paper_value": get("paper"), "unit": get("unit") if "unit" in row.index else None,
                             "source": get("paper_source") if "paper_source" in row.index else NA,
                             "ours": get("ours"), "diff": get("diff", get("diff_vs_paper")),
                             "pass": (bool(get("pass")) if "pass" in row.index and not pd.isna(get("pass")) else None)})
    return pd.DataFrame(rows, columns=["paper", "claim", "paper_value", "unit", "source", "ours", "diff", "pass"])


def _runs_table(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in runs:
        git = r["meta"].get("git", {}) or {}
        rows.append({"notebook": r["name"], "profile": r["profile"], "status": r["status"], "minutes": r["minutes"],
                     "finished (UTC)": r["finished"], "commit": (git.get("commit") or "?")[:10],
                     "tree": "dirty" if git.get("dirty") else ("clean" if git.get("dirty") is False else "?"),
                     "device": _device(r["meta"]), "seed": r["meta"].get("seed")})
    df = pd.DataFrame(rows, columns=["notebook", "profile", "status", "minutes", "finished (UTC)", "commit", "tree",
                                     "device", "seed"]).astype({"seed": object})  # the total row has no seed
    for profile in sorted(set(df["profile"])):
        mins = pd.to_numeric(df.loc[df["profile"] == profile, "minutes"], errors="coerce")
        df.loc[len(df)] = {"notebook": "total", "profile": profile, "status": "", "minutes": round(mins.sum(), 2),
                           "finished (UTC)": "", "commit": "", "tree": "", "device": "", "seed": ""}
    return df


def _notebooks_on_disk(results_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(results_dir).glob("[0-9][0-9]_*") if p.is_dir())


def _run_metadata(runs: list[dict], profile: str) -> dict:
    """The run's metadata line of the landing page: commits, clean/dirty, profile, CPU or GPU, total minutes."""
    commits = sorted({(r["meta"].get("git", {}) or {}).get("commit") or "?" for r in runs})
    dirty = [(r["meta"].get("git", {}) or {}).get("dirty") for r in runs]
    gpus = sorted({(r["meta"].get("device", {}) or {}).get("gpu") or "" for r in runs} - {""})
    mins = pd.to_numeric(pd.Series([r["minutes"] for r in runs], dtype=object), errors="coerce")
    return {"profile": profile, "commit": ", ".join(c[:10] for c in commits) or "?",
            "tree": ("dirty" if any(dirty) else "clean" if dirty and all(d is False for d in dirty) else "?"),
            "device": ("GPU: " + ", ".join(gpus)) if gpus else ("CPU" if runs else "?"),
            "minutes": f"{mins.sum():.1f}" if len(mins) else "0", "n_runs": len(runs)}


def _key_figure(meta: dict, folder: Path) -> Optional[dict]:
    """The report's key figure: the one the notebook saved with ``key=True``, else its first saved figure."""
    figs = [f for f in meta.get("figures", []) if (folder / f["png"]).is_file()]
    if not figs:
        return None
    return next((f for f in figs if f.get("key")), figs[0])


def write_index(results_dir: Path, root: Optional[Path] = None, profile: str = SITE_PROFILE,
                notebooks: Optional[list[str]] = None, include_smoke: Optional[bool] = None) -> dict:
    """Regenerate the results site of ``profile`` from what is on disk: its landing page, its results README and its
    forest plot (names by :func:`tokenbook.io.site_file`: ``index.html``, ``README.md``, ``forest.png`` /
    ``forest.csv`` for the committed cpu profile; ``index-<profile>.html``, ... for any other), over the runs of that
    profile only (``<notebook>/<profile>/`` and ``<notebook>/<profile>-failed/``) and its claims ledger. Another
    profile's files are never written; the landing page links to every other profile's page present.

    ``notebooks``: the notebooks to show (the runner passes its list); default: the ``NN_*`` folders on disk.
    ``include_smoke`` is accepted for older callers and ignored (a smoke run has its own ``index-smoke.html``).
    Returns the paths written."""
    from jinja2 import Environment, FileSystemLoader
    from markupsafe import Markup

    results_dir = Path(results_dir)
    notebooks = list(notebooks) if notebooks is not None else _notebooks_on_disk(results_dir)
    runs = collect_runs(results_dir, notebooks, profile=profile)
    runs_df, head = _runs_table(runs), headline_table(runs)
    names = {k: site_file(k, profile) for k in ("index.html", "README.md", "claims.csv", "CLAIMS.md", "forest.png",
                                                 "forest.csv")}
    claims = _read_ledger(results_dir, profile)
    written = {}

    # README(-<profile>).md (Markdown, same formatting rules as the reports)
    lines = ["# Results" + ("" if profile == SITE_PROFILE else f" of the {profile} profile"), "",
             f"Profile `{profile}`. Generated by `./run_all.sh` (do not edit by hand); the landing page is "
             f"[{names['index.html']}]({names['index.html']}). Paper values carry their source; `n/a` means the paper "
             "does not state the number. CPU timings are from a 2-core CPU and are not comparable to the papers' "
             "GPUs.", "", to_markdown(runs_df, "Runs"), ""]
    if claims is not None:
        counts = claims["verdict"].value_counts()
        lines += ["## Claims ledger", "", f"{len(claims)} claims of the five papers and of their cross-paper "
                  "compositions: " + ", ".join(f"{k} {int(v)}" for k, v in counts.items())
                  + f". Full table with statements, sources, scale and details: [{names['CLAIMS.md']}]"
                  f"({names['CLAIMS.md']}) ([{names['claims.csv']}]({names['claims.csv']})).", "",
                  to_markdown(claims[[c for c in _LEDGER_SHORT if c in claims.columns]]), ""]
    if len(head):
        lines += [to_markdown(head, "Headline: the paper's number, ours"), ""]
    for r in runs:
        rel = r["dir"].relative_to(results_dir)
        name, folder, meta = r["name"], r["profile"], r["meta"]
        sec = [f"## {name} ({folder})", "", f"Status: **{r['status']}**, {r['minutes']} min. Report: "
               f"[{name}.html]({rel}/{name}.html), executed notebook: [{name}.ipynb]({rel}/{name}.ipynb)."]
        if r["detail"]:
            sec.append(f"\nError: `{r['detail']}`")
        if r["last_failure"]:
            sec.append(f"\nThe latest run of this notebook failed ({r['last_failure'].get('detail')}); these are the "
                       "previous results.")
        for t in meta.get("tables", []):
            md = r["dir"] / t["md"]
            if md.is_file():
                sec += ["", f"### {t['name']}", "", md.read_text().strip()]
        for f in meta.get("figures", []):
            sec += ["", f"![{f['name']}]({rel}/{f['png']})" + (f"  \n*{f['caption']}*" if f.get("caption") else "")]
        lines += sec + [""]
    written["README.md"] = atomic_write(results_dir / names["README.md"], "\n".join(lines))

    # the forest plot of every claim (PNG + its data as CSV)
    forest = None
    if claims is not None:
        forest = write_forest(claims, results_dir / names["forest.png"], results_dir / names["forest.csv"])
        if forest is not None:
            written["forest.png"], written["forest.csv"] = forest, results_dir / names["forest.csv"]

    # the per-paper summary: verdict counts and the key figure of each notebook's report
    by_name = {r["name"]: r for r in runs if r["profile"] == profile}
    by_name.update({r["name"]: r for r in runs if r["name"] not in by_name})  # only a failed run: show that
    summary = []
    for name in notebooks:
        stem = name.split("_", 1)[1] if "_" in name else name
        r = by_name.get(name)
        counts = {v: 0 for v in _VERDICT_ORDER}
        if claims is not None and "paper" in claims.columns:
            for v, n in claims.loc[claims["paper"] == stem, "verdict"].value_counts().items():
                counts[v] = counts.get(v, 0) + int(n)
        if r is None and not any(counts.values()):
            continue
        rel = r["dir"].relative_to(results_dir).as_posix() if r else ""
        key = _key_figure(r["meta"], r["dir"]) if r else None
        summary.append({
            "name": name, "stem": stem, "title": _title(name), "status": r["status"] if r else "not run",
            "minutes": r["minutes"] if r else "", "counts": counts,
            "html": f"{rel}/{name}.html" if r and (r["dir"] / f"{name}.html").is_file() else None,
            "thumb": {"href": f"{rel}/{key['png']}", "name": key["name"], "caption": key.get("caption", "")}
            if key else None})

    papers = []
    for r in runs:
        rel = r["dir"].relative_to(results_dir).as_posix()
        name = r["name"]
        papers.append({
            "name": name, "profile": r["profile"], "title": _title(name), "status": r["status"],
            "minutes": r["minutes"], "detail": r["detail"],
            "html": f"{rel}/{name}.html" if (r["dir"] / f"{name}.html").is_file() else None,
            "ipynb": f"{rel}/{name}.ipynb" if (r["dir"] / f"{name}.ipynb").is_file() else None,
            "figures": [{"name": f["name"], "href": f"{rel}/{f['png']}", "caption": f.get("caption", "")}
                        for f in r["meta"].get("figures", []) if (r["dir"] / f["png"]).is_file()],
            "tables": [{"name": t["name"], "href": f"{rel}/{t['csv']}"}
                       for t in r["meta"].get("tables", []) if (r["dir"] / t["csv"]).is_file()],
        })
    others = []
    for p in sorted(results_dir.glob("index*.html")):
        prof = SITE_PROFILE if p.name == "index.html" else p.stem[len("index-"):]
        if prof != profile and site_file("index.html", prof) == p.name:
            others.append({"profile": prof, "href": p.name})
    env = Environment(loader=FileSystemLoader(str(TEMPLATES / "site")), autoescape=True)
    headline_html = _markup(style_table(head, "") if len(head) else None)
    html = env.get_template("index.html.j2").render(
        profile=profile, committed=profile == SITE_PROFILE, others=others, meta=_run_metadata(runs, profile),
        summary=summary, verdicts=_VERDICT_ORDER, verdict_colours=_VERDICT_COLOURS,
        verdict_labels=_VERDICT_LABELS, forest=names["forest.png"] if forest is not None else None,
        forest_csv=names["forest.csv"], forest_caption=FOREST_CAPTION,
        ledger=_ledger_rows(claims) if claims is not None else None,
        ledger_columns=_LEDGER_SHOWN, ledger_csv=names["claims.csv"], ledger_md=names["CLAIMS.md"],
        readme=names["README.md"], headline_html=headline_html if len(head) else None,
        runs_html=Markup(style_table(runs_df, "").to_html()), papers=papers,
    )
    written["index.html"] = atomic_write(results_dir / names["index.html"], html)
    return written


# ----------------------------------------------------------------------------------------------------------
# the forest plot of every claim
# ----------------------------------------------------------------------------------------------------------
FOREST_CAPTION = (
    "One row per claim, grouped by paper; a marker is the effect, its bar the 95 % interval (for a timed ratio: the "
    "interquartile range of interleaved repeats), coloured by verdict. Units are never mixed: each panel has its "
    "own axis. Differences (top-1 points, or the claim's own unit): the signed distance from the claim's margin, "
    "turned so that right of 0 is the claimed side ('≥' as is, '≤' mirrored, 'within' as margin − |effect|). "
    "Ratios (speed-ups, MACs ratios): ratio ÷ margin on a log axis, right of 1 is the claimed side. Structural "
    "claims and other exact values: tolerance ÷ |ours − paper| (or the bound ÷ ours) on a log axis, right of 1 "
    "within the tolerance or the bound; ▶ at the right edge: an exact match (a difference of 0). Claims without a measurement (not testable here, failed) have no marker; their verdict is "
    "written at the right.")

_VERDICT_ORDER = ("reproduced", "contradicted", "inconclusive", "not_testable_here", "failed")
_VERDICT_LABELS = {"reproduced": "reproduced", "contradicted": "contradicted", "inconclusive": "inconclusive",
                   "not_testable_here": "not testable", "failed": "failed"}


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def _unit(quantity: str) -> str:
    """The unit of a claim's quantity: top-1 differences are points (``pt``), then logits, then percentages, else the
    short part of its last parenthesis (``(x; median ...)`` -> ``x``, ``(G)``)."""
    import re as _re

    low = str(quantity or "").lower()
    if "top-1" in low or "top1" in low:
        return "pt"
    if "logit" in low:
        return "logits"
    if "%" in low:
        return "%"
    groups = _re.findall(r"\(([^()]*)\)", str(quantity or ""))
    if not groups:
        return ""
    parts = [p.strip() for p in groups[-1].split(";")]
    short = [p for p in (parts[0], parts[-1]) if p and len(p) <= 12]
    u = short[0] if short else ""
    return {"points": "pt", "pts": "pt"}.get(u, u)


def _claim_specs(papers) -> dict:
    """claim id -> Claim from the reference sheets (direction, margin, tolerance, paper value), for ledgers that
    lack the ``direction`` / ``margin`` columns."""
    from .claims import ClaimError, load_claims

    out = {}
    for p in papers:
        try:
            out.update({c.id: c for c in load_claims(str(p))})
        except (ClaimError, OSError, ValueError):
            continue
    return out


def forest_data(claims: pd.DataFrame) -> pd.DataFrame:
    """The forest plot's rows, one per ledger row in ledger order: panel (``difference (<unit>)``, ``ratio`` or
    ``structural``), the oriented effect ``x`` and interval ``lo``/``hi`` in that panel's scale, and the reference
    line ``ref`` (0 for a difference, 1 for the log panels); rows without a measurement have an empty panel."""
    specs = _claim_specs(claims["paper"].dropna().unique()) if "paper" in claims.columns else {}
    rows = []
    for _, r in claims.iterrows():
        get = r.get
        cid, verdict, kind = str(get("claim", "")), str(get("verdict", "")), str(get("kind", ""))
        spec = specs.get(cid)
        direction = get("direction") if isinstance(get("direction"), str) and get("direction") else (
            spec.direction if spec else ">=")
        margin = _num(get("margin")) if _num(get("margin")) is not None else (spec.margin if spec else 0.0)
        ours, lo, hi = _num(get("ours")), _num(get("ci_low")), _num(get("ci_high"))
        row = {"paper": get("paper"), "claim": cid, "kind": kind, "verdict": verdict, "direction": direction,
               "margin": margin, "unit": _unit(get("quantity")), "ours": ours, "ci_low": lo, "ci_high": hi,
               "panel": "", "x": None, "lo": None, "hi": None, "ref": None, "exact": False}
        method = str(get("method", "") or "")
        if verdict in ("not_testable_here", "failed") or ours is None:
            rows.append(row)
            continue
        rule = spec.rule if spec else ""
        if rule in ("bound", "exact") and lo is None:  # one exact value against a bound or a tolerance
            limit = spec.tolerance if rule == "exact" else margin
            if direction in (">=", ">") and rule == "bound":
                exact, x = False, (ours / limit if limit else float("inf"))
            else:
                exact = ours <= 1e-12 and (limit or 0.0) >= 0.0
                x = float("inf") if exact else (limit / ours if ours > 0 else 0.0)
            row.update(panel="structural", x=x, lo=x, hi=x, ref=1.0, exact=exact)
            rows.append(row)
            continue
        if kind == "structural":
            pv = _num(get("paper_value")) if _num(get("paper_value")) is not None else (
                spec.paper_value if spec else None)
            tol = spec.tolerance if spec and spec.tolerance is not None else None
            if pv is None or tol is None:
                import re as _re

                m = _re.search(r"= ([-+0-9.e]+) vs tolerance ([-+0-9.e]+)", method)
                diff, tol = (float(m.group(1)), float(m.group(2))) if m else (None, None)
            else:
                diff = abs(ours - pv)
            if diff is None:
                rows.append(row)
                continue
            exact = diff <= 1e-12 * max(1.0, abs(pv or 0.0))
            x = float("inf") if exact else (tol / diff if tol else 0.0)
            row.update(panel="structural", x=x, lo=x, hi=x, ref=1.0, exact=exact)
        elif lo is not None and hi is not None and ("IQR" in method or kind == "hardware") and margin > 0:
            if direction in ("<=", "<"):
                x, a, b = margin / ours, margin / hi, margin / lo
            else:
                x, a, b = ours / margin, lo / margin, hi / margin
            row.update(panel="ratio", x=x, lo=a, hi=b, ref=1.0)
        elif lo is not None and hi is not None:
            if direction in ("<=", "<"):
                x, a, b = margin - ours, margin - hi, margin - lo
            elif direction == "within":
                far = max(abs(lo), abs(hi))
                near = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
                x, a, b = margin - abs(ours), margin - far, margin - near
            else:
                x, a, b = ours - margin, lo - margin, hi - margin
            row.update(panel=f"difference ({row['unit'] or 'own unit'})", x=x, lo=a, hi=b, ref=0.0)
        rows.append(row)
    return pd.DataFrame(rows)


def write_forest(claims: pd.DataFrame, png: Path, csv: Optional[Path] = None) -> Optional[Path]:
    """Draw the forest plot of the ledger ``claims`` to ``png`` (matplotlib, Agg) and its data (:func:`forest_data`)
    to ``csv``. One shared y axis (a row per claim, grouped by paper, ledger order), one panel per unit kind. Returns
    the PNG path, or None (printed) when it cannot be drawn: the landing page is written without it."""
    try:
        import io as _io

        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        data = forest_data(claims)
        if csv is not None:
            atomic_write(csv, data.to_csv(index=False))
        panels = [p for p in data["panel"].unique() if p]
        panels = sorted(panels, key=lambda p: (not p.startswith("difference (pt"), p.startswith("structural"),
                                               p.startswith("ratio"), p))
        n = len(data)
        ys = np.arange(n)[::-1]
        width = [1.6 if len(data[data["panel"] == p]) > 2 else 1.1 for p in panels] + [0.75]
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.0 + 0.9 * sum(width), 0.8 + 0.165 * n),
                                 sharey=True, gridspec_kw={"width_ratios": width, "wspace": 0.08}, squeeze=False)
        axes = axes[0]
        labels = [f"{c}" for c in data["claim"]]
        for ax, panel in zip(axes, panels):
            sub = data[data["panel"] == panel]
            log = panel in ("ratio", "structural")
            finite = [v for col in ("lo", "hi", "x") for v in sub[col] if v is not None and np.isfinite(v) and
                      (v > 0 or not log)]
            if log:
                lo_lim = min([0.5] + finite) / 1.6
                hi_lim = max([2.0] + finite) * 1.6
            else:
                span = max([abs(v) for v in finite] + [1.0]) * 1.12
                lo_lim, hi_lim = -span, span
            for i, r in sub.iterrows():
                y = ys[i]
                col = _VERDICT_COLOURS.get(r["verdict"], "#1f2328")
                x, a, b = r["x"], r["lo"], r["hi"]
                if r["exact"] or (log and not np.isfinite(x)):
                    ax.plot([hi_lim / 1.25], [y], marker=">", color=col, ms=6, ls="")
                    continue
                if log:
                    x, a, b = (max(v, lo_lim * 1.05) for v in (x, a, b))
                ax.plot([a, b], [y, y], color=col, lw=2.2, solid_capstyle="butt")
                ax.plot([x], [y], marker="o", color=col, ms=4.5, ls="")
            ax.axvline(sub["ref"].iloc[0], color="#57606a", lw=1, ls="--")
            if log:
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

                ax.set_xscale("log")
                ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 1000) if lo_lim <= t <= hi_lim]
                ax.xaxis.set_major_locator(FixedLocator(ticks))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(lo_lim, hi_lim)
            title = {"ratio": "ratio ÷ margin\n(log)", "structural": "exact values: tolerance\n÷ |deviation| (log)",
                     "difference (pt)": "distance from margin\n(top-1 points)"}
            ax.set_title(title.get(panel, panel.replace("difference (", "from margin\n(")), fontsize=8)
            ax.tick_params(labelsize=7.5)
            ax.grid(axis="x", color="#e4e4e4", lw=0.6)
        text_ax = axes[-1]
        text_ax.set_xlim(0, 1)
        text_ax.axis("off")
        for i, r in data.iterrows():
            text_ax.text(0.02, ys[i], _VERDICT_LABELS.get(r["verdict"], r["verdict"]), va="center", fontsize=7.5,
                         color=_VERDICT_COLOURS.get(r["verdict"], "#1f2328"))
        text_ax.set_title("verdict", fontsize=8.5)
        axes[0].set_yticks(ys)
        axes[0].set_yticklabels(labels, fontsize=7.5)
        axes[0].set_ylim(-0.7, n - 0.3)
        # paper groups: a light band on every other paper, across every panel
        papers = list(data["paper"])
        starts = [i for i in range(n) if i == 0 or papers[i] != papers[i - 1]]
        for k, s0 in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else n
            if k % 2 == 0:
                for ax in axes:
                    ax.axhspan(ys[e - 1] - 0.5, ys[s0] + 0.5, color="#f3f4f6", zorder=-1, lw=0)
        for ax in axes[:-1]:
            ax.tick_params(axis="y", length=0)
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return atomic_write(png, buf.getvalue())
    except Exception as e:  # the site is written without the plot, never lost because of it
        print(f"warning: forest plot not drawn: {type(e).__name__}: {e}", file=sys.stderr)
        return None


#: the ledger columns of the landing page's table, in order (the claim id starts with its paper); long texts are
#: folded (``<details>``)
_LEDGER_SHOWN = ("claim", "statement", "kind", "criterion", "paper_value", "ours", "ci_low", "ci_high", "n",
                 "verdict", "seeds_needed", "scale", "plateau", "detail", "report")
_LEDGER_FOLDED = ("statement", "scale", "plateau", "detail", "source", "quantity", "method")


def _ledger_rows(claims: pd.DataFrame) -> list[dict]:
    """The ledger's rows for the template: each cell's text (formatted as the tables are), folded or not."""
    from .io import format_value

    rows = []
    for _, r in claims.iterrows():
        cells = []
        for c in _LEDGER_SHOWN:
            v = r.get(c) if c in claims.columns else None
            text = format_value(v, c)
            if c == "claim" and "quantity" in claims.columns:
                cells.append({"col": c, "text": text, "title": format_value(r.get("quantity"), "quantity")})
            elif c == "report":
                cells.append({"col": c, "href": v if isinstance(v, str) and v else None, "text": text})
            elif c in _LEDGER_FOLDED:
                cells.append({"col": c, "text": text, "fold": text != "n/a" and len(text) > 0})
            else:
                cells.append({"col": c, "text": text,
                              "numeric": (isinstance(v, (int, float)) and c not in ("n", "criterion")) or c == "n"})
        rows.append({"verdict": str(r.get("verdict", "")), "cells": cells})
    return rows


_VERDICT_COLOURS = {"reproduced": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700",
                    "not_testable_here": "#57606a", "failed": "#cf222e"}


_LEDGER_SHORT = ("paper", "claim", "kind", "criterion", "paper_value", "ours", "ci_low", "ci_high", "n", "verdict",
                 "seeds_needed", "scale")


def _read_ledger(results_dir: Path, profile: str = SITE_PROFILE) -> Optional[pd.DataFrame]:
    """The profile's ledger (``claims.csv``, ``claims-<profile>.csv``) when it exists and has rows (else None)."""
    p = Path(results_dir) / site_file("claims.csv", profile)
    if not p.is_file():
        return None
    try:
        df = pd.read_csv(p)
    except (ValueError, OSError):
        return None
    return df if len(df) else None


def _markup(styler) -> Any:
    from markupsafe import Markup

    return Markup(styler.to_html() if styler is not None else "<p>No headline tables yet.</p>")


# ----------------------------------------------------------------------------------------------------------
# screenshots of the landing page (headless Chromium through Playwright)
# ----------------------------------------------------------------------------------------------------------
def screenshot(page_path: Path, png: Path, width: int = 1400, height: int = 900, full_page: bool = False) -> Path:
    """A PNG screenshot of a local page (``file://``) in headless Chromium at ``width`` x ``height`` (the whole page
    with ``full_page``). Needs ``playwright`` and a Chromium (``chromium`` on the PATH)."""
    import shutil

    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            data = page.screenshot(full_page=full_page)
        finally:
            browser.close()
    return atomic_write(png, data)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tokenbook.report --screenshot PAGE PNG [--full-page]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tokenbook.report", description="screenshot a results page")
    ap.add_argument("--screenshot", nargs=2, metavar=("PAGE", "PNG"), required=True)
    ap.add_argument("--full-page", action="store_true")
    ap.add_argument("--size", default="1400x900", help="viewport WIDTHxHEIGHT")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(screenshot(Path(args.screenshot[0]), Path(args.screenshot[1]), w, h, args.full_page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
