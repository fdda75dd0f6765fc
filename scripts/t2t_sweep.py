"""The recipe sweep behind 02_t2t_vit's cpu profile (issue 19): one from-scratch variant run (one thread) per call,
through the notebook's own store trainer (tokenbook.experiments.t2t_vit.variant_spec / train_variant_run) with the
cpu profile's parameters and the overrides given. Prints one JSON line: final top-1, best, the plateau gain
(tokenbook.claims.plateau) and the wall time.

    PYTHONPATH=lib python scripts/t2t_sweep.py --name base --variant vit --seed 2 [-s key=value ...] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--variant", default="vit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-s", "--set", action="append", default=[], help="parameter override key=value (YAML value)")
    ap.add_argument("--out", default="", help="append the JSON line to this file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from tokenbook import data
    from tokenbook.claims import plateau
    from tokenbook.experiments import t2t_vit

    root = Path(__file__).resolve().parents[1]
    prof = yaml.safe_load((root / "notebooks/params/02_t2t_vit/cpu.yaml").read_text())
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    p = t2t_vit.Params.from_mapping({**prof, **over})
    bundle = data.load_data(p.data_config())
    variants = t2t_vit.fmnist_ablations(img_size=p.img_size, in_chans=p.channels, num_classes=bundle.num_classes,
                                        embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads, tokens=p.tokens)
    name, kw = variants[a.variant]
    kw = {**kw, "drop_path_rate": p.drop_path_rate, "num_classes": bundle.num_classes, "img_size": p.img_size,
          "in_chans": p.channels}
    cfg = dataclasses.replace(p.train_config(), seed=a.seed, progress=False)
    spec = t2t_vit.variant_spec(name, kw, bundle.config, cfg, p.batch_size, p.num_workers)
    t0 = time.time()
    out = t2t_vit.train_variant_run(**spec.args)
    wall = time.time() - t0
    curve = [100 * float(x) if float(x) <= 1 else float(x) for x in out.history["val_top1"]]
    ok, gain = plateau(curve)
    row = {"name": a.name, "variant": a.variant, "seed": a.seed, "set": over, "final": round(curve[-1], 2),
           "best": round(max(curve), 2), "last20": round(gain, 2), "plateaued": bool(ok), "wall_s": round(wall, 1),
           "epochs": int(p.epochs), "curve": [round(c, 2) for c in curve]}
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
