"""The recipe sweep behind 02_t2t_vit's cpu profile (issue 19): one from-scratch variant run (one thread) per call,
through the notebook's own store trainer (tokenbook.experiments.t2t_vit.variant_spec / train_variant_run) with the
cpu profile's parameters and the overrides given. Prints one JSON line: final top-1, best, the plateau gain
(tokenbook.claims.plateau) and the wall time.

    PYTHONPATH=lib python scripts/t2t_sweep.py --name base --variant vit --seed 2 [-s key=value ...] [--out F]
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    from sweep_common import emit, sweep_args

    a = sweep_args("one 02_t2t_vit cpu-profile variant run", "vit")
    torch.set_num_threads(1)
    from tokenbook import data
    from tokenbook.experiments import t2t_vit

    root = Path(__file__).resolve().parents[1]
    prof = yaml.safe_load((root / "notebooks/params/02_t2t_vit/cpu.yaml").read_text())
    p = t2t_vit.Params.from_mapping({**prof, **a.over})
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
    emit(a, out.history, time.time() - t0, p.epochs, variant=a.variant, seed=a.seed)

if __name__ == "__main__":
    main()
