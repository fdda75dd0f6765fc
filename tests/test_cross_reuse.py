"""06_cross_paper reuses 01-03's runs of the store: its specs of those arms must have the same store key as the
specs 01_vittm, 02_t2t_vit and 03_toe's notebooks build from their cpu profiles (built here the way their notebooks'
cells build them), so that ./run_all.sh trains each run once. Fails when either side changes."""
import dataclasses
from pathlib import Path

import pytest

from tokenbook import runs as R
from tokenbook.experiments import baselines as X_base
from tokenbook.experiments import cross_paper as X
from tokenbook.experiments import t2t_vit, toe, vittm
from tokenbook.runner import profile_parameters

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]


def _notebook_specs(num_classes: int = 10) -> dict:
    """{(seed, arm): spec} as the notebooks' cells build them (01 cell 'models', 02 'variants', 03 'train_seeds')."""
    from tokenbook.experiments import t2t_vit_runs, vittm_runs

    out = {}
    p1 = profile_parameters(ROOT, "01_vittm", "cpu")  # 01: dcfg, tcfg, models[p.model_name]
    ttm_kwargs = dict(drop_path_rate=p1.drop_path_rate, **({"embed_dim": p1.embed_dim} if p1.embed_dim else {}))
    tcfg1 = vittm.make_train_config(p1, p1.recipe)
    p2 = profile_parameters(ROOT, "02_t2t_vit", "cpu")  # 02: fmnist_ablations, p.train_config(), train_seeds
    variants = t2t_vit.fmnist_ablations(img_size=p2.img_size, in_chans=p2.channels, num_classes=num_classes,
                                        embed_dim=p2.embed_dim, depth=p2.depth, num_heads=p2.num_heads, tokens=p2.tokens)
    name2, kw2 = variants["t2t_performer"]
    kw2 = {**kw2, "drop_path_rate": p2.drop_path_rate, "num_classes": num_classes, "img_size": p2.img_size,
           "in_chans": p2.channels}
    p3 = profile_parameters(ROOT, "03_toe", "cpu")  # 03: model_kwargs, toe_config, train_config
    kw3 = dict(num_classes=num_classes, img_size=p3.img_size, drop_path_rate=p3.drop_path_rate)
    for s in SEEDS:
        out[(s, "vittm")] = vittm_runs.run_spec(p1.model_name, {**dict(ttm_kwargs, img_size=p1.img_size),
                                                                "num_classes": num_classes},
                                                p1.data_config(), dataclasses.replace(tcfg1, seed=s), p1.batch_size,
                                                p1.num_workers)
        out[(s, "t2t")] = t2t_vit_runs.variant_spec(name2, kw2, p2.data_config(),
                                                    dataclasses.replace(p2.train_config(), seed=s), p2.batch_size,
                                                    p2.num_workers)
        for arm, tk in (("vit", None), ("vit_toe", toe.toe_config(p3))):
            out[(s, arm)] = toe.arm_spec(p3.model_name, kw3, tk, p3.toe_block_index, p3.data_config(),
                                         toe.train_config(p3), p3.batch_size, s, p3.num_workers)
    return out


def _cross_cpu():
    p = profile_parameters(ROOT, "06_cross_paper", "cpu")
    return p, X.pixel_specs(X.parse_arms(p.arms), list(p.seeds), p, 10, "cpu", ROOT)


def test_cross_paper_reuses_01_to_03_runs_by_key():
    p, ours = _cross_cpu()
    assert p.reuse_notebook_runs and p.executor == "processes" and list(p.seeds) == SEEDS
    theirs = _notebook_specs()
    for (s, arm), spec in theirs.items():
        assert (s, arm) in ours, (s, arm)
        # the key of the run store (threads: 2 processes x 1 thread on the 2-core machine, as 01-03 launch)
        assert R.run_key(ours[(s, arm)], 1) == R.run_key(spec, 1), f"{arm} seed {s}: {ours[(s, arm)].args} != {spec.args}"
        assert ours[(s, arm)].trainer == spec.trainer
    # the compositions are new runs, paired with their partner: same data, recipe, batch, model, seed
    for s in SEEDS:
        for comp, base in (("t2t_toe", "t2t"), ("vittm_toe", "vittm")):
            a, b = ours[(s, comp)].args, theirs[(s, base)].args
            assert a["toe_kwargs"] is not None and a["model_name"] == b["model_name"]
            assert a["data"] == b["data"] and a["batch_size"] == b["batch_size"]
            assert {k: v for k, v in a["train"].items() if k != "progress"} == \
                {k: v for k, v in b["train"].items() if k != "progress"}
            from tokenbook.experiments import vittm_runs
            assert vittm_runs.canonical_kwargs(a["model_name"], a["model_kwargs"]) == \
                vittm_runs.canonical_kwargs(b["model_name"], b["model_kwargs"])
            assert R.run_key(ours[(s, comp)], 1) != R.run_key(theirs[(s, base)], 1)


def test_a_changed_side_changes_the_key():
    p, ours = _cross_cpu()
    theirs = _notebook_specs()



    spec = theirs[(0, "vit")]
    other = toe.arm_spec(spec.args["model_name"], spec.args["model_kwargs"], None, 0, spec.args["data"],
                         {**spec.args["train"], "lr": 0.003}, spec.args["batch_size"], 0)
    assert R.run_key(other, 1) != R.run_key(ours[(0, "vit")], 1)


def test_reuse_refuses_a_split_that_is_not_the_other_notebooks():
    p = profile_parameters(ROOT, "06_cross_paper", "cpu")
    for change, what in ((dict(train_subset=5000), "train/val"), (dict(epochs=10), "train/val"),
                         (dict(source_classes=[0, 1, 2, 3, 4]), "source_classes"),
                         (dict(vit_model="vit_fm_tiny_p4_28"), "vit:")):
        with pytest.raises(ValueError, match=what):
            X.pixel_specs(["vit", "vittm", "t2t"], [0], p.replace(**change), 10, "cpu", ROOT)


def test_own_specs_without_reuse_use_this_notebooks_split_and_recipe():
    p = profile_parameters(ROOT, "06_cross_paper", "smoke")
    assert not p.reuse_notebook_runs
    specs = X.pixel_specs(X.parse_arms(["vit", "vit_toe", "t2t"]), [0, 1], p, 10, "smoke", ROOT)
    assert set(specs) == {(s, k) for s in (0, 1) for k in ("vit", "vit_toe", "t2t")}
    a = specs[(0, "vit")].args
    # the full-token arm is the workbook's plain classifier run (the same stored run as 00's ViT where they agree)
    assert specs[(0, "vit")].trainer == "tokenbook.experiments.baselines_runs:train_classifier"
    assert specs[(0, "vit_toe")].trainer == "tokenbook.experiments.toe_runs:train_arm_run"
    assert a["data"]["channels"] == 1 and a["data"]["train_subset"] == p.train_subset and a["train"]["epochs"] == p.epochs
    assert "toe_kwargs" not in a and specs[(0, "vit_toe")].args["toe_kwargs"]["keep_rate"] == [0.5, 0.75, 1.0]
    # an arm and its ToE twin share model, data, recipe and batch; only ToE differs (and the bar, which decides nothing)
    b = specs[(0, "vit_toe")].args
    assert a["model_name"] == b["model_name"] and a["data"] == b["data"] and a["batch_size"] == b["batch_size"]
    assert X_base.canonical_model_kwargs(b["model_name"], b["model_kwargs"]) == a["model_kwargs"]
    assert {k: v for k, v in a["train"].items() if k != "progress"} == \
        {k: v for k, v in b["train"].items() if k != "progress"}
    assert specs[(1, "vit")].args["train"]["seed"] == 1 and specs[(1, "vit_toe")].args["seed"] == 1


def test_cpu_seed_plan_gives_the_vittm_pair_seven_seeds_and_reuses_01s_vittm_runs():
    """06's cpu profile plans seeds by power from its frozen pilot (stop 34's run): toe_vittm_lossless needs 7, so
    vittm and vittm_toe train seeds 0-6 and every other arm 0-2; the vittm runs of the new seeds are 01's section-2
    runs of the store (same key), only vittm_toe's are new."""
    from tokenbook import claims as C

    p = profile_parameters(ROOT, "06_cross_paper", "cpu")
    seeds, plan = C.plan_seeds(p.seeds, p.seed_pilot, p.seed_cap, paper="cross_paper", root=ROOT)
    assert seeds == list(range(7))
    per = X.arm_seed_plan(plan, seeds, X.parse_arms(p.arms), len(p.seeds))
    assert per == {"vit": [0, 1, 2], "vittm": list(range(7)), "t2t": [0, 1, 2], "vit_toe": [0, 1, 2],
                   "t2t_toe": [0, 1, 2], "vittm_toe": list(range(7)), "seit": [0, 1, 2], "t2t_tokens": [0, 1, 2]}
    specs = X.pixel_specs(X.parse_arms(p.arms), seeds, p, 10, "cpu", ROOT, arm_seeds=per)
    assert set(specs) == {(s, k) for k, ss in per.items() for s in ss if X.ARMS[k].input == "pixels"}
    p1 = profile_parameters(ROOT, "01_vittm", "cpu")
    s1, _ = C.plan_seeds(p1.seeds, p1.seed_pilot, p1.seed_cap, paper="vittm", root=ROOT)
    assert set(range(7)) <= set(s1)  # 01 trains these seeds of its ViTTM
    theirs = _notebook_specs()
    want = theirs[(0, "vittm")]
    for s in range(3, 7):
        spec = dataclasses.replace(want, args={**want.args, "train": {**want.args["train"], "seed": s}},
                                   label=f"{want.args['model_name']} seed {s}")
        assert R.run_key(specs[(s, "vittm")], 1) == R.run_key(spec, 1)


def test_run_seeds_trains_each_arm_its_own_seeds(idx_dir, tmp_path):
    """run_seeds with arm_seeds: an arm trains only its listed seeds (through the store), and the numbers measured
    once (MACs) come from each arm's first seed."""
    p = profile_parameters(ROOT, "06_cross_paper", "smoke").replace(
        data_dir=str(idx_dir), train_subset=32, val_subset=16, epochs=3, batch_size=16, max_steps=2,
        reuse_notebook_runs=False, latency=False)
    bundle = X.source_bundle(p)
    launched: list = []
    runs = X.run_seeds(["vit", "vit_toe"], [0, 1], p, bundle, latency=False, launched=launched,
                       launch={"executor": "kernel", "store": str(tmp_path / "runs")},
                       arm_seeds={"vit": [0, 1], "vit_toe": [1]})
    assert sorted(runs) == [(0, "vit"), (1, "vit"), (1, "vit_toe")]
    assert len({r.key for r in launched}) == 3
    assert runs[(1, "vit_toe")].row["train_tmacs"] > 0  # measured on its first (and only) seed
    assert runs[(1, "vit")].row["infer_gmacs"] == runs[(0, "vit")].row["infer_gmacs"]


def test_token_arms_run_through_the_store_and_are_judged_on_the_heldout_ids(idx_dir, tmp_path, monkeypatch):
    """06's token arms are runs of the store (04's trainer with 06's models and hook): a second run_seeds reads
    them back with the same numbers; T2T-ViT on tokens has the T2T-ViT arm's depth and heads; judge_heldout
    evaluates them on the ids the stored tokenizer writes for every held-out image (as tokenbook.train.evaluate
    there) and refuses them without those ids."""
    import torch

    from tokenbook import heldout
    from tokenbook.train import evaluate

    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "runs"))
    p = profile_parameters(ROOT, "06_cross_paper", "smoke").replace(
        data_dir=str(idx_dir), train_subset=32, val_subset=16, epochs=1, batch_size=16, max_steps=2,
        tokenizer_steps=2, tokenizer_downsample=4, tokenizer_pad=2, crop=8, rrc_scale_min=1.0, emb_noise=0.1,
        token_cutmix=0.0, latency=False, reuse_notebook_runs=False, token_dir=str(tmp_path / "tok"),
        t2t_depth=3, t2t_num_heads=2, depth=2)
    bundle = X.source_bundle(p)
    tokens = X.build_tokens(bundle, p, "smoke")
    assert tokens.train.ids.shape[-2:] == (8, 8)
    arms = ["seit", "t2t_tokens"]
    specs = X.token_specs(arms, [0], p, bundle, tokens)
    t2t = specs[(0, "t2t_tokens")].args
    assert t2t["model_kwargs"]["depth"] == 3 and t2t["model_kwargs"]["num_heads"] == 2
    assert specs[(0, "seit")].args["model_kwargs"]["depth"] == 2 and t2t["hook"] == X.hook_settings(p)
    launched: list = []
    runs = X.run_seeds(arms, [0], p, bundle, tokens, latency=False, launched=launched,
                       launch={"executor": "kernel"})
    assert {r.source for r in launched} == {"trained"} and runs[(0, "seit")].row["train_tmacs"] > 0
    again: list = []
    runs2 = X.run_seeds(arms, [0], p, bundle, tokens, latency=False, launched=again, launch={"executor": "kernel"})
    assert {r.source for r in again} == {"store"}
    assert runs2[(0, "t2t_tokens")].row["top1"] == runs[(0, "t2t_tokens")].row["top1"]
    ho = heldout.heldout_bundle(bundle.config)
    with pytest.raises(ValueError, match="held-out ids"):
        X.judge_heldout(runs, ho)
    loader = X.heldout_token_loader(tokens, ho)
    assert len(loader.dataset) == len(ho.val)
    got = X.judge_heldout(runs, ho, loader)
    for key, r in runs.items():
        want = evaluate(r.model, loader, device=torch.device("cpu"))["top1"]
        assert got[key] == pytest.approx(want) and r.row["top1"] == got[key]
        assert r.row["val_subset_top1"] == runs2[key].row["top1"]
