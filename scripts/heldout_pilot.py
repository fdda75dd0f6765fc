"""Write 02_t2t_vit's seed pilot on the held-out split (issue 19): the stored cpu runs of 02 (seeds 0-2), evaluated
once more on every test image of their classes (tokenbook.heldout), as a claims_evidence.json-format file that
tokenbook.claims.plan_seeds reads.

    python scripts/heldout_pilot.py [--out notebooks/params/02_t2t_vit/cpu_pilot.json]

It asks the run store for the cpu profile's runs with the code it runs under (so under another code version it
trains them first). The committed pilot was written from the runs of the committed cpu results of 533bb8a: this
script, with tokenbook.heldout beside that commit's package, read all 18 runs from the store.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "notebooks/params/02_t2t_vit/cpu_pilot.json"))
    args = ap.parse_args()

    import tokenbook.models  # noqa: F401
    from tokenbook import claims, heldout
    from tokenbook.data import load_data
    from tokenbook.experiments import t2t_vit as exp

    values = yaml.safe_load((ROOT / "notebooks/params/02_t2t_vit/cpu.yaml").read_text())
    values = {k: v for k, v in values.items() if k in exp.Params.specs()}
    p = exp.Params.from_mapping({**values, "seeds": [0, 1, 2]})
    dcfg = p.data_config()
    bundle = load_data(dcfg)
    variants = exp.fmnist_ablations(img_size=p.img_size, in_chans=p.channels, num_classes=bundle.num_classes,
                                    embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads, tokens=p.tokens)
    keys = ["t2t_performer", "no_t2t", "t2t_transformer", "deep_narrow", "shallow_wide", "vit"]
    runs = exp.train_seeds(variants, bundle, p.train_config(), keys, batch_size=p.batch_size, seeds=[0, 1, 2],
                           num_workers=p.num_workers, model_kwargs={"drop_path_rate": p.drop_path_rate},
                           executor=p.executor)
    ho = heldout.heldout_bundle(dcfg)
    top = {s: heldout.heldout_top1(runs.runs[s].models, ho) for s in runs.seeds}
    out = []
    for claim, (a, b) in exp.CLAIM_ARMS.items():
        xa, xb = [top[s][a] for s in runs.seeds], [top[s][b] for s in runs.seeds]
        out.append({"claim": claim, "scale": f"pilot: 02's cpu runs, seeds 0-2, {heldout.describe(bundle, ho)}",
                    "a": xa, "b": xb, "value": None, "ratio": None, "q1": None, "q3": None, "report": "",
                    "detail": f"a = {a}, b = {b}", "plateau": "", "curves": [], "failed_run": ""})
        print(claim, [round(x - y, 2) for x, y in zip(xa, xb)])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)
    print(claims.plan_seeds([0, 1, 2], args.out, 8, paper="t2t_vit")[1].to_string())


if __name__ == "__main__":
    main()
