"""What the recipe-sweep scripts share (scripts/seit_sweep.py, scripts/t2t_sweep.py): their command line and the
JSON line each run prints: final top-1, best, the plateau gain (tokenbook.claims.plateau) and the wall time."""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import yaml


def sweep_args(description: str, variant: str, extra: Sequence[tuple[str, dict]] = ()) -> argparse.Namespace:
    """``--name``, ``--variant`` (default ``variant``), ``--seed``, ``-s key=value`` overrides (YAML values, parsed
    into ``.over``), ``--out`` and the script's ``extra`` arguments."""
    ap = argparse.ArgumentParser(description=description)
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    ap.add_argument("--name", required=True)
    ap.add_argument("--variant", default=variant)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-s", "--set", action="append", default=[], help="parameter override key=value (YAML value)")
    ap.add_argument("--out", default="", help="append the JSON line to this file")
    a = ap.parse_args()
    a.over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    return a


def emit(a: argparse.Namespace, history: Any, wall: float, epochs: int, **fields: Any) -> dict:
    """Print (and append to ``a.out``) one JSON line for the run whose ``history`` has a ``val_top1`` column."""
    from tokenbook.claims import plateau

    curve = [100 * float(x) if float(x) <= 1 else float(x) for x in history["val_top1"]]
    ok, gain = plateau(curve)
    row = {"name": a.name, **fields, "set": a.over, "final": round(curve[-1], 2), "best": round(max(curve), 2),
           "last20": round(gain, 2), "plateaued": bool(ok), "wall_s": round(wall, 1), "epochs": int(epochs),
           "curve": [round(c, 2) for c in curve]}
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return row
