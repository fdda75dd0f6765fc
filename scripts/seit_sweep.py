"""The recipe sweep behind 04_seit's cpu profile (issue 19): one SeiT-arm run (seed 0, one thread) per call, through
the notebook's own store trainer (tokenbook.experiments.seit.variant_spec / train_variant_run), on token files
written by the notebook's cpu profile (build_default_tokens). Prints one JSON line: final top-1, best, the plateau
gain (tokenbook.claims.plateau) and the wall time.

    PYTHONPATH=lib python scripts/seit_sweep.py --tokens <token dir> --name base [-s key=value ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True, help="folder of the cpu profile's token files")
    ap.add_argument("--name", required=True)
    ap.add_argument("--variant", default="seit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-s", "--set", action="append", default=[], help="parameter override key=value (YAML value)")
    ap.add_argument("--out", default="", help="append the JSON line to this file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from tokenbook.claims import plateau
    from tokenbook.experiments import seit

    root = Path(__file__).resolve().parents[1]
    prof = yaml.safe_load((root / "notebooks/params/04_seit/cpu.yaml").read_text())
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    P = seit.Params.from_mapping({**prof, **over})
    p = {k: P[k] for k in P}
    from tokenbook.data import tokens as T
    tdir = Path(a.tokens)
    td = seit.TokenData(train=T.read_token_file(T.token_file_paths(tdir, "fmnist", "train")),
                        val=T.read_token_file(T.token_file_paths(tdir, "fmnist", "val")),
                        codebook=T.load_codebook(tdir / "codebook.ckpt"),
                        synonyms=seit.load_synonyms(tdir / "codebook-synonyms.json"), num_classes=10,
                        source="sweep", root=tdir)
    tokens = {"root": str(tdir.resolve()), "name": "fmnist", "sha": seit.token_fingerprint(td), "num_classes": 10,
              "code_dim": int(td.codebook.shape[1])}
    spec = seit.variant_spec(a.variant, p, a.seed, P.data_config(), tokens, None, 10)
    t0 = time.time()
    out = seit.train_variant_run(**spec.args)
    wall = time.time() - t0
    curve = [100 * float(x) if float(x) <= 1 else float(x) for x in out.history["val_top1"]]
    ok, gain = plateau(curve)
    row = {"name": a.name, "set": over, "final": round(curve[-1], 2), "best": round(max(curve), 2),
           "last20": round(gain, 2), "plateaued": bool(ok), "wall_s": round(wall, 1),
           "epochs": int(p["epochs"]), "curve": [round(c, 2) for c in curve]}
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
