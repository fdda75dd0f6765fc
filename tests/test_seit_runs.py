"""04_seit through the workbook's run store (issue 20): one stored run per (variant, seed), the same numbers as the
kernel path, a second launch that trains nothing; the padded 8x8 token grid of the cpu scale; the token floor and
the floors in the claims (issue 19)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import tokenbook.models  # noqa: F401  (registers the token ViTs)
from tokenbook.experiments import seit as R

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["pixel", "seit", "seit_ta_ca"]


@pytest.fixture(scope="module")
def tiny(idx_dir, tmp_path_factory):
    """A tiny default-data setting at the cpu scale's geometry: 28 px padded to 32, downsample 4 (8x8 ids), crop 8
    (16 tokens), a few tokenizer and TokenAdapt steps, two training steps per run."""
    from tokenbook import data

    torch.set_num_threads(1)
    bundle = data.load_data(data.DataConfig(data_dir=str(idx_dir), train_subset=64, val_subset=32))
    root = tmp_path_factory.mktemp("tok")
    td = R.build_default_tokens(bundle, root, downsample=4, pad=2, steps=2, batch_size=16, hidden=8,
                                codebook_size=64)
    ta, _ = R.train_default_tokenadapt(td, bundle, 8, steps=2, batch_size=8, dim=16, heads=2, dim_head=8, pad=2)
    params = {**R.Params(profile="smoke").__dict__, "crop": 8, "epochs": 1, "max_steps_per_epoch": 2,
              "batch_size": 8, "accelerator": "cpu", "token_model": "deit_fm_micro_token_32",
              "pixel_model": "vit_fm_tiny_p7_28", "pixel_cutmix": 0.0}
    return bundle, td, ta, params


def test_padded_tokens_give_the_cpu_scale_grid(tiny):
    bundle, td, ta, _ = tiny
    assert td.grid == (8, 8) and td.tokenizer.image_size == 32
    x = R.token_images(bundle.val, pad=2, n=3)
    assert x.shape[-2:] == (32, 32) and int(x[..., :2, :].max()) == 0 and int(x[..., :, -2:].max()) == 0
    assert torch.equal(x[..., 2:30, 2:30], bundle.val.images_tensor(3))
    assert (ta.in_grid, ta.out_grid) == (8, 8)
    with pytest.raises(ValueError, match="pad"):
        R.token_images(bundle.val, pad=-1)


def test_store_path_equals_kernel_path_and_a_second_launch_trains_nothing(tiny, tmp_path):
    bundle, td, ta, params = tiny
    k_runs, k_hist = R.train_ablation(VARIANTS, params, [0], td, bundle, ta)
    s_runs, s_hist = R.train_ablation(VARIANTS, params, [0], td, bundle, ta, via_store=True,
                                    store=str(tmp_path / "runs"))
    assert [r.source for r in s_hist.launched] == ["trained"] * 3 and k_hist.launched == []
    cols = ["seed", "variant", "top1", "top5", "params_m", "gmacs", "steps", "gain_vs_seit_pts"]
    pd.testing.assert_frame_equal(k_runs[cols], s_runs[cols])
    for key in k_hist:
        pd.testing.assert_frame_equal(k_hist[key].drop(columns=[c for c in k_hist[key] if "time" in c or c.endswith("_s")]),
                                      s_hist[key].drop(columns=[c for c in s_hist[key] if "time" in c or c.endswith("_s")]))
    again_runs, again = R.train_ablation(VARIANTS, params, [0], td, bundle, ta, via_store=True,
                                       store=str(tmp_path / "runs"))
    assert [r.source for r in again.launched] == ["store"] * 3
    pd.testing.assert_frame_equal(s_runs[cols], again_runs[cols])
    # the rebuilt classifier is the trained one: its stored weights give the stored top-1
    spec = R.ablation_specs(["seit"], params, [0], td, bundle, ta)[0][2]
    res = R.rebuild_variant(spec.args, again.launched[1].output)
    ids = torch.from_numpy(np.asarray(td.val.ids).astype(np.int64))
    with torch.no_grad():
        acc = 100.0 * float((res.model.eval()(ids).argmax(-1).numpy() == td.val.labels).mean())
    assert acc == pytest.approx(float(s_runs.loc[s_runs.variant == "seit", "top1"].iloc[0]))


def test_specs_name_the_token_files_and_refuse_changed_ones(tiny, tmp_path):
    bundle, td, ta, params = tiny
    plan = R.ablation_specs(VARIANTS, params, [0, 1], td, bundle, ta)
    assert [(v, s) for v, s, _ in plan] == [(v, s) for s in (0, 1) for v in VARIANTS]
    a = {(v, s): spec.args for v, s, spec in plan}
    assert a[("pixel", 0)]["tokens"] if "tokens" in a[("pixel", 0)] else True
    assert a[("seit", 0)]["tokens"]["sha"] == R.token_fingerprint(td) and a[("seit", 0)]["tokenadapt"] is None
    assert a[("seit_ta_ca", 1)]["tokenadapt"]["sha"] == R.module_fingerprint(ta)
    assert a[("seit", 1)]["train"]["seed"] == 1 and a[("seit", 1)]["model_kwargs"]["img_size"] == 8
    assert a[("pixel", 0)]["train"]["cutmix"] == 0.0 and a[("seit", 0)]["train"]["cutmix"] == 0.0
    bad = {**a[("seit", 0)]["tokens"], "sha": "0" * 16}
    with pytest.raises(ValueError, match="changed since"):
        R._read_tokens(bad)
    with pytest.raises(ValueError, match="f/g"):
        R.ablation_specs(["seit_ta"], params, [0], td, bundle, None)


def test_each_arm_trains_its_own_seeds(tiny, tmp_path):
    """``arm_seeds`` (the power plan's seeds per arm): the specs, the kernel path and the store path train each
    variant only on its seeds, with the same rows; the summary pairs the gains on the seeds both arms have."""
    bundle, td, ta, params = tiny
    own = {"seit": [0, 1], "seit_ta_ca": [0]}
    plan = R.ablation_specs(["seit", "seit_ta_ca"], params, [0, 1], td, bundle, ta, arm_seeds=own)
    assert [(v, s) for v, s, _ in plan] == [("seit", 0), ("seit_ta_ca", 0), ("seit", 1)]
    k_runs, k_hist = R.train_ablation(["seit", "seit_ta_ca"], params, [0, 1], td, bundle, ta, arm_seeds=own)
    s_runs, s_hist = R.train_ablation(["seit", "seit_ta_ca"], params, [0, 1], td, bundle, ta, via_store=True,
                                      store=str(tmp_path / "runs"), arm_seeds=own)
    assert sorted(k_hist) == sorted(s_hist) == [("seit", 0), ("seit", 1), ("seit_ta_ca", 0)]
    cols = ["seed", "variant", "top1", "gain_vs_seit_pts"]
    pd.testing.assert_frame_equal(k_runs[cols], s_runs[cols])
    summary = R.seed_summary(s_runs).set_index("variant")
    assert summary.loc["seit", "n_seeds"] == 2 and summary.loc["seit_ta_ca", "n_seeds"] == 1
    with pytest.raises(ValueError, match="outside the run's seeds"):
        R.ablation_specs(["seit"], params, [0], td, bundle, ta, arm_seeds={"seit": [0, 7]})


def test_token_floor_and_floors_in_the_claims(tiny):
    from tokenbook import claims as C

    _, td, _, _ = tiny
    x, y = R.token_features(td, "val", 8)
    assert x.shape == (len(td.val), 32 * 8 * 8) and len(y) == len(td.val)
    ft = R.token_floors_table(td, 8)
    assert ft["model"].iloc[0].startswith("logistic") and 0 <= ft["top1"].iloc[0] <= 100
    fp = pd.DataFrame([{"model": "logistic regression on pixels", "top1": 84.0, "params": 7850, "train_s": 1.0}])
    ft = ft.assign(top1=80.0)
    runs = pd.DataFrame([{"seed": s, "variant": v, "model": R.PAPER_LABELS[v], "input": R.VARIANTS[v][0], "top1": t,
                          "params_m": 0.3, "train_wall_s": 5.0}
                         for v, per in {"pixel": {0: 85.0, 1: 83.0}, "seit": {0: 81.0, 1: 82.0},
                                        "seit_ca": {0: 79.0, 1: 83.0}}.items() for s, t in per.items()])
    hist = {(v, s): pd.DataFrame({"val_top1": [50.0, 80.0, 80.1, 80.2, 80.2]}) for v in ("pixel", "seit", "seit_ca")
            for s in (0, 1)}
    ev = {e.claim: e for e in R.claims_evidence(runs, hist, "tiny", pixel_floors=fp, token_floors=ft)}
    # the pixel arm's seed 1 is below the pixel floor (84); SeiT's runs are above the token floor (80), not the pixel one
    assert "pixel seed 1 (83.0 %)" in ev["seit.tokens_approach_pixels"].failed_run
    assert "seit seed" not in ev["seit.tokens_approach_pixels"].failed_run
    assert "seit_ca seed 0 (79.0 %)" in ev["seit.coloradapt_gain"].failed_run
    assert ev["seit.coloradapt_gain"].plateau.startswith("yes")
    assert C.judge(next(c for c in C.load_claims("seit") if c.id == "seit.coloradapt_gain"),
                   ev["seit.coloradapt_gain"]).verdict == "failed"
    table = R.arms_beside_floors(runs, fp, ft).set_index("model")
    assert table.loc["SeiT (seit)", "vs_logistic_floor_pts"] == pytest.approx(81.5 - 80.0)
    assert table.loc["Full pixels (pixel)", "vs_logistic_floor_pts"] == pytest.approx(84.0 - 84.0)
    assert table.loc["logistic regression on token embeddings", "input"] == "tokens"


def test_tokenizer_and_tokenadapt_are_stored_runs(tiny, tmp_path):
    """issue 20: the tokenizer and TokenAdapt f/g are runs of the store, keyed by their spec: the first call trains
    them (the same tokens and f/g as the kernel path), a second call reads them, another recipe is another run."""
    bundle, td, ta, _ = tiny
    p = {"tokenizer_downsample": 4, "codebook_size": 64, "code_dim": 32, "tokenizer_hidden": 8, "tokenizer_steps": 2,
         "tokenizer_batch": 16, "tokenizer_lr": 2e-3, "seed": 0, "tokenizer_pad": 2, "accelerator": "cpu", "crop": 8,
         "ta_steps": 2, "ta_batch": 8, "ta_lr": 1e-3, "ta_dim": 16, "ta_heads": 2, "ta_dim_head": 8,
         "ta_per_sample": True, "ta_mix_prob": 0.0}
    store = str(tmp_path / "runs")
    first, run = R.stored_tokens(bundle, tmp_path / "a", p, via_store=True, store=store)
    assert run.source == "trained" and R.token_fingerprint(first) == R.token_fingerprint(td)
    again, run2 = R.stored_tokens(bundle, tmp_path / "b", p, via_store=True, store=store)
    assert run2.source == "store" and run2.key == run.key
    assert R.token_fingerprint(again) == R.token_fingerprint(td) and again.tokenizer_history == first.tokenizer_history
    f1, h1, r1 = R.stored_tokenadapt(again, bundle, p, via_store=True, store=store)
    assert r1.source == "trained" and R.module_fingerprint(f1) == R.module_fingerprint(ta) and len(h1)
    f2, _, r2 = R.stored_tokenadapt(again, bundle, p, via_store=True, store=store)
    assert r2.source == "store" and R.module_fingerprint(f2) == R.module_fingerprint(f1)
    assert R.tokenadapt_spec(p, bundle.config, again).args["tokens"]["sha"] == R.token_fingerprint(td)
    assert R.tokenizer_spec({**p, "tokenizer_steps": 3}, bundle.config).canonical() != \
        R.tokenizer_spec(p, bundle.config).canonical()


def test_heldout_judgement_evaluates_every_stored_run_on_every_heldout_image(tiny, tmp_path):
    """04's judge_heldout: the held-out split tokenized by the run's own tokenizer (same training ids, every test
    image), every stored (variant, seed) classifier evaluated once more (the pixel arm on pixels, the token arms on
    ids), the same numbers as evaluating the rebuilt models by hand; refused without stored runs."""
    from tokenbook import data, heldout
    from tokenbook.train import evaluate

    bundle, td, ta, params = tiny
    ho = heldout.heldout_bundle(bundle.config)
    ho_td = R.heldout_tokens(td, ho, tmp_path / "ho")
    assert len(ho_td.val) == len(ho.val) > len(td.val)
    assert np.array_equal(ho_td.train.ids, td.train.ids) and ho_td.grid == td.grid
    variants = ["pixel", "seit", "seit_ta"]
    runs, hist = R.train_ablation(variants, params, [0, 1], td, bundle, ta, via_store=True,
                                  store=str(tmp_path / "runs"), arm_seeds={"seit_ta": [0]})
    got = R.add_heldout(runs, hist, ho, ho_td)
    assert list(got["top1"]) == list(runs["top1"]) and heldout.HELDOUT_COLUMN not in runs
    rec = {(r.spec.args["variant"], r.spec.args["seed"]): r for r in hist.launched}
    seit1 = R.rebuild_variant(rec[("seit", 1)].spec.args, rec[("seit", 1)].output).model
    want = evaluate(seit1, R.token_loaders(ho_td, 64, eda=False)[1], device=torch.device("cpu"))["top1"]
    row = got[(got["variant"] == "seit") & (got["seed"] == 1)]
    assert row[heldout.HELDOUT_COLUMN].item() == pytest.approx(want)
    px0 = R.rebuild_variant(rec[("pixel", 0)].spec.args, rec[("pixel", 0)].output).model
    loader = data.make_loaders(ho, 64, device="cpu")[1]
    want = evaluate(px0, loader, preprocess=ho.preprocess, device=torch.device("cpu"))["top1"]
    row = got[(got["variant"] == "pixel") & (got["seed"] == 0)]
    assert row[heldout.HELDOUT_COLUMN].item() == pytest.approx(want)
    k_runs, k_hist = R.train_ablation(["seit"], params, [0], td, bundle, ta)
    with pytest.raises(ValueError, match="run store"):
        R.add_heldout(k_runs, k_hist, ho, ho_td)


def test_04s_cpu_profile_judges_on_the_heldout_split():
    from conftest import ROOT
    from tokenbook.runner import profile_parameters

    assert dict(profile_parameters(ROOT, "04_seit", "cpu"))["judge_heldout"] is True
    for prof in ("smoke", "gpu", "full"):
        assert dict(profile_parameters(ROOT, "04_seit", prof))["judge_heldout"] is False, prof
