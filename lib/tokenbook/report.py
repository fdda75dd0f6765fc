"""Reports people read: the HTML report of each executed notebook and the results site (``results/index.html``,
the landing page, and ``results/README.md``).

- :func:`render_html`: nbconvert's lab template made self-contained (``templates/tokenbook_report``): code hidden,
  figures embedded as ``data:`` images, no script or font from the network (no require.js, MathJax, mermaid or
  widget CDNs), math in Markdown cells pre-rendered to MathML (``latex2mathml``) so it shows offline, and a bar that
  links back to the landing page.
- :func:`write_index`: the landing page (headline table across the papers, run metadata, figure thumbnails, links to
  every report, executed notebook and table) and ``results/README.md``, both from what is on disk, with the tables
  formatted by :func:`tokenbook.results.style_table` / :func:`~tokenbook.results.to_markdown`.

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

from .results import NA, atomic_write, style_table, to_markdown

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


def collect_runs(results_dir: Path, notebooks: list[str], include_smoke: bool = False) -> list[dict]:
    """One record per (notebook, profile) folder on disk: status, minutes, metadata, tables, figures."""
    runs = []
    for name in notebooks:
        nb_dir = results_dir / name
        if not nb_dir.is_dir():
            continue
        for pdir in sorted(p for p in nb_dir.iterdir() if p.is_dir()):
            profile = pdir.name
            if profile.endswith(".old") or profile == "interactive":
                continue
            if profile.startswith("smoke") and not include_smoke:
                continue
            st, meta = _read_json(pdir / "status.json"), _read_json(pdir / "meta.json")
            if not st and not meta:
                continue
            runs.append({"name": name, "profile": profile, "dir": pdir, "status": st.get("status", "?"),
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


def write_index(results_dir: Path, root: Path, include_smoke: bool = False) -> None:
    """Regenerate ``results/README.md`` and the landing page ``results/index.html`` from what is on disk (every
    profile but ``smoke``, unless ``include_smoke``: the browser test builds the site over smoke results)."""
    from jinja2 import Environment, FileSystemLoader

    from .runner import list_notebooks

    results_dir = Path(results_dir)
    runs = collect_runs(results_dir, list_notebooks(root), include_smoke)
    runs_df, head = _runs_table(runs), headline_table(runs)

    # README.md (Markdown, same formatting rules as the reports)
    lines = ["# Results", "",
             "Generated by `./run_all.sh` (do not edit by hand); the landing page is [index.html](index.html). Paper",
             "values carry their source; `n/a` means the paper does not state the number. CPU timings are from a",
             "2-core CPU and are not comparable to the papers' GPUs.", "", to_markdown(runs_df, "Runs"), ""]
    claims = _read_ledger(results_dir)
    if claims is not None:
        counts = claims["verdict"].value_counts()
        lines += ["## Claims ledger", "", f"{len(claims)} claims of the five papers and of their cross-paper "
                  "compositions: " + ", ".join(f"{k} {int(v)}" for k, v in counts.items())
                  + ". Full table with statements, sources, scale and details: [CLAIMS.md](CLAIMS.md) "
                  "([claims.csv](claims.csv)).", "",
                  to_markdown(claims[[c for c in _LEDGER_SHORT if c in claims.columns]]), ""]
    if len(head):
        lines += [to_markdown(head, "Headline: the paper's number, ours"), ""]
    for r in runs:
        rel = r["dir"].relative_to(results_dir)
        name, profile, meta = r["name"], r["profile"], r["meta"]
        sec = [f"## {name} ({profile})", "", f"Status: **{r['status']}**, {r['minutes']} min. Report: "
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
    atomic_write(results_dir / "README.md", "\n".join(lines))

    # index.html
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
    env = Environment(loader=FileSystemLoader(str(TEMPLATES / "site")), autoescape=True)
    if claims is not None:  # the claims ledger (tokenbook.claims.build_ledger) heads the site when it exists
        from markupsafe import Markup

        headline_html = _markup(_verdict_styled(claims))
        if len(head):
            headline_html += Markup("<h3>Headline tables of the notebooks</h3>") + _markup(style_table(head, ""))
        note = ("Every claim of the five papers, and of the compositions no paper ran (06_cross_paper), with its "
                "verdict on this workbook's evidence (claims.csv, "
                "CLAIMS.md): reproduced / contradicted / inconclusive by the 95 % interval of the paired difference "
                "over seeds against the claim's margin; the scale column says what was run, plateau whether the "
                "validation accuracy had stopped rising.")
    else:
        headline_html = _markup(style_table(head, "") if len(head) else None)
        note = ("Rows of the tables each notebook marks as its headline; ✓ / ✗: within / outside the tolerance "
                "stated in the reference sheet, n/a: no tolerance or no paper value.")
    title = "Claims ledger: every claim, its verdict" if claims is not None else "Headline: the paper's number, ours"
    html = env.get_template("index.html.j2").render(
        papers=papers, headline_html=headline_html, headline_note=note, headline_title=title,
        runs_html=_markup(style_table(runs_df, "")),
    )
    atomic_write(results_dir / "index.html", html)


_VERDICT_COLOURS = {"reproduced": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700",
                    "not_testable_here": "#57606a", "failed": "#cf222e"}


_LEDGER_SHORT = ("paper", "claim", "kind", "paper_value", "ours", "ci_low", "ci_high", "n", "verdict", "scale")


def _read_ledger(results_dir: Path) -> Optional[pd.DataFrame]:
    """``claims.csv`` when it exists and has rows (else None)."""
    p = results_dir / "claims.csv"
    if not p.is_file():
        return None
    try:
        df = pd.read_csv(p)
    except (ValueError, OSError):
        return None
    return df if len(df) else None


def _verdict_styled(claims: pd.DataFrame):
    cols = [c for c in ("paper", "claim", "statement", "kind", "paper_value", "source", "ours", "ci_low", "ci_high",
                        "n", "verdict", "scale", "plateau", "report") if c in claims.columns]
    st = style_table(claims[cols], "")
    if "report" in cols:  # a link to the notebook's report (paths relative to the results folder)
        from html import escape

        st = st.format(lambda v: f'<a href="{escape(v)}">report</a>' if isinstance(v, str) and v else "n/a",
                       subset=["report"])
    if "verdict" in cols:
        st = st.map(lambda v: f"color: {_VERDICT_COLOURS.get(v, '#1f2328')}; font-weight: 700;", subset=["verdict"])
    return st


def _markup(styler) -> Any:
    from markupsafe import Markup

    return Markup(styler.to_html() if styler is not None else "<p>No headline tables yet.</p>")
