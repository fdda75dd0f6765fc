#!/usr/bin/env python3
"""Compare every CSV table of two results trees, leaving out timing columns.

    python scripts/compare_results.py OLD_RESULTS NEW_RESULTS [--profile cpu] [--rename old_nb=new_nb ...]

Timing columns (names ending in ``_s``, ``_ms``, ``img_s`` or containing latency, throughput, minutes, speedup
measured from wall time, ``*_per_s``) are dropped before comparing; everything else must be equal cell by cell
(floats compared exactly as written). Prints one line per file and exits 1 when any table differs or is missing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

TIMING = re.compile(r"(_s$|_ms$|img_s$|_per_s$|latency|throughput|minutes|wall|step_time|elapsed|_sec$|timing|"
                    r"speedup_measured|overhead|\biqr\b|_iqr|median_s|^runs$|time_ratio|speedup_vs_|ms_per_step|step_ms|^speedup$|measured_ratio)", re.I)


def timing_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if TIMING.search(str(c))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--rename", action="append", default=[], help="old_notebook=new_notebook")
    ap.add_argument("--ignore-columns", default="", help="extra regex of columns to leave out")
    a = ap.parse_args(argv)
    ren = dict(r.split("=", 1) for r in a.rename)
    extra = re.compile(a.ignore_columns) if a.ignore_columns else None
    bad = 0
    for old_csv in sorted(a.old.glob(f"*/{a.profile}/*.csv")):
        nb = old_csv.parts[-3]
        new_csv = a.new / ren.get(nb, nb) / a.profile / old_csv.name
        rel = f"{nb}/{a.profile}/{old_csv.name}"
        if not new_csv.is_file():
            print(f"MISSING  {rel}")
            bad += 1
            continue
        o, n = pd.read_csv(old_csv, dtype=str, keep_default_na=False), pd.read_csv(new_csv, dtype=str,
                                                                                 keep_default_na=False)
        drop = set(timing_columns(o)) | set(timing_columns(n))
        if extra:
            drop |= {c for c in set(o.columns) | set(n.columns) if extra.search(str(c))}
        o, n = o.drop(columns=[c for c in drop if c in o]), n.drop(columns=[c for c in drop if c in n])
        # long tables: a row whose metric / quantity names a timing (latency_ms, latency_speedup, ...) is timing too
        label_cols = [c for c in ("metric", "quantity", "what") if c in o.columns and c in n.columns]
        timed = [i for i in o.index if i in n.index and any(TIMING.search(str(o.at[i, c])) or
                                                             re.search(r"latency|throughput|step.time|wall.time|this run|interleaved", str(o.at[i, c]), re.I)
                                                             for c in label_cols)]
        if timed:
            o, n = o.drop(index=timed), n.drop(index=[i for i in timed if i in n.index])
        if list(o.columns) != list(n.columns) or o.shape != n.shape:
            print(f"DIFFER   {rel}: columns/shape {list(o.columns)} {o.shape} vs {list(n.columns)} {n.shape}")
            bad += 1
            continue
        diff = (o != n)
        if diff.values.any():
            cells = [(i, c, o.at[i, c], n.at[i, c]) for c in o.columns for i in o.index if diff.at[i, c]]
            print(f"DIFFER   {rel}: {len(cells)} cells, e.g. " + "; ".join(f"row {i} {c}: {x!r} -> {y!r}"
                                                                          for i, c, x, y in cells[:4]))
            bad += 1
        else:
            out = "; ".join(x for x in (", ".join(sorted(drop)), f"{len(timed)} timing rows" if timed else "") if x)
            print(f"same     {rel}" + (f"  (left out: {out})" if out else ""))
    for new_csv in sorted(a.new.glob(f"*/{a.profile}/*.csv")):
        nb = new_csv.parts[-3]
        inv = {v: k for k, v in ren.items()}
        if not (a.old / inv.get(nb, nb) / a.profile / new_csv.name).is_file():
            print(f"NEW      {nb}/{a.profile}/{new_csv.name}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
