"""The recipe sweep behind 04_seit's cpu profile (issue 19): one SeiT-arm run (seed 0, one thread) per call, through
the notebook's own store trainer (tokenbook.experiments.seit.variant_spec / train_variant_run), on token files
written by the notebook's cpu profile (build_default_tokens). Prints one JSON line: final top-1, best, the plateau
gain (tokenbook.claims.plateau) and the wall time.

    PYTHONPATH=lib python scripts/seit_sweep.py --tokens <token dir> --name base [-s key=value ...]
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    from sweep_common import emit, sweep_args

    a = sweep_args("one 04_seit cpu-profile token-arm run", "seit",
                   [("--tokens", {"required": True, "help": "folder of the cpu profile's token files"})])
    torch.set_num_threads(1)
    from tokenbook.experiments import seit

    root = Path(__file__).resolve().parents[1]
    prof = yaml.safe_load((root / "notebooks/params/04_seit/cpu.yaml").read_text())
    P = seit.Params.from_mapping({**prof, **a.over})
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
    emit(a, out.history, time.time() - t0, p["epochs"], variant=a.variant, seed=a.seed)

if __name__ == "__main__":
    main()
