"""Notebook 04_seit: its smoke results, the experiment helpers (tokenbook.experiments.seit) and the full recipe
run for one step on a tiny token release written by the writer."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import tokenbook.models  # noqa: F401  (registers the token ViTs)
from tokenbook.experiments import seit as R
from tokenbook.data import tokens as T
from tokenbook.models import seit as S
from tokenbook.runner import profile_parameters

from conftest import ROOT

NB = "04_seit"


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(profile: str, **overrides) -> dict:
    """The notebook's Params under a profile + overrides (validated like a run's), as a dict."""
    return dict(profile_parameters(ROOT, NB, profile, overrides))


# ------------------------------------------------------------------------------------------------ smoke results
@pytest.mark.notebook
def test_smoke_tables_show_ours_beside_the_paper(smoke_results):
    record, folder = smoke_results(NB)
    assert record["status"] == "ok"
    meta = json.loads((folder / "meta.json").read_text())
    assert {f["name"] for f in meta["figures"]} >= {"decoded_tokens", "pixel_vs_token_aug", "synonym_replacements",
                                                    "storage", "training_curves"}

    desc = pd.read_csv(folder / "token_data.csv").iloc[0]
    assert desc["grid"] == "14x14" and desc["codebook"] == "391x32" and desc["train_records"] == 256

    st = pd.read_csv(folder / "storage.csv").set_index("format")
    assert st.loc["raw pixels (uint8)", "bytes_per_image"] == 784
    assert st.loc["tokens (escape-coded, no gzip)", "bytes_per_image"] >= 196    # one byte per id, two above 254
    assert st.loc["tokens (entropy bound, uniform)", "bytes_per_image"] == pytest.approx(196 * math.log2(391) / 8)
    for fmt in ("PNG", "JPEG q95", "JPEG q5", "tokens (gzip stream + gzip index)", "tokens (train split files on disk)"):
        assert st.loc[fmt, "bytes_per_image"] > 0
    sp = pd.read_csv(folder / "storage_vs_paper.csv")
    seit = sp[(sp.model == "SeiT") & (sp.metric == "storage_pct_of_jpeg")].iloc[0]
    assert seit["paper"] == 1 and seit["paper_source"].endswith("[paper]") and seit["ours"] > 0
    gb = sp[sp.metric == "storage_gb"].set_index("model")["paper"]
    assert gb["SeiT"] == 1.4 and gb["Full pixels (JPEG)"] == 140

    ab = pd.read_csv(folder / "ablation.csv")
    assert ab["variant"].tolist() == ["pixel", "seit", "seit_ca", "seit_ta", "seit_ta_ca"]
    assert ab["top1"].between(0, 100).all() and (ab["gmacs"] > 0).all()
    assert np.allclose(ab["gflops"], 2 * ab["gmacs"])
    assert (ab["steps"] == 2).all()
    tok_bytes = ab.loc[ab.input == "tokens", "storage_bytes_per_image"]
    assert (tok_bytes < ab.loc[ab.input == "pixels", "storage_bytes_per_image"].iloc[0]).all()
    assert ab.loc[ab.variant == "seit", "gain_vs_seit_pts"].iloc[0] == 0

    wide = pd.read_csv(folder / "accuracy_vs_storage.csv").set_index("model")
    assert wide.loc["SeiT", "paper_top1_in100_vit_s"] == 77.3 and wide.loc["SeiT", "paper_top1_in1k_vit_b"] == 74.0
    both = wide.loc["SeiT + TokenAdapt + ColorAdapt"]
    assert both["paper_top1_in100_vit_s"] == 81.4 and both["paper_top1_in1k_vit_b"] == 75.5
    assert both["paper_gain_vs_seit_pts"] == 4.1
    assert both["gain_diff_pts"] == pytest.approx(both["ours_gain_vs_seit_pts"] - 4.1)
    assert wide.loc["Full pixels", "paper_top1_in1k_vit_b"] == 81.8
    assert math.isnan(wide.loc["Full pixels", "paper_top1_in100_vit_s"])       # unknown: n/a, never invented
    assert "third_party" in wide.loc["SeiT", "paper_source"]

    long = pd.read_csv(folder / "ablation_vs_paper.csv")
    ours_top1 = long[long.metric == "top1"]
    assert len(ours_top1) == 5 and ours_top1["paper"].isna().all() and ours_top1["diff"].isna().all()
    paper_rows = long[long.paper.notna()]
    assert paper_rows["paper_source"].str.contains(r"\[(?:third_party|computed)\]").all()
    in100 = paper_rows[paper_rows.metric == "top1_in100"]
    assert in100["ours"].isna().all() and sorted(in100["paper"]) == [77.3, 78.3, 80.4, 81.4]
    assert "n/a" in (folder / "ablation_vs_paper.md").read_text()

    rec = pd.read_csv(folder / "recipe.csv").set_index("variant")
    assert rec.loc["pixel", "cutmix"] == 1.0 and rec.loc["pixel", "label_smoothing"] == 0.1
    assert (rec.loc[["seit", "seit_ta_ca"], ["mixup", "cutmix", "label_smoothing"]] == 0).all().all()
    sweep = pd.read_csv(folder / "recipe_sweep.csv")           # the cpu recipe's sweep, shown in every profile
    assert len(sweep) == len(R.RECIPE_SWEEP) and sweep["chosen"].sum() == 1 and sweep["usable"].any()

    q = pd.read_csv(folder / "tokenizer_quality.csv").iloc[0]
    assert q["mse"] >= 0 and q["codebook_size"] == 391
    ta = pd.read_csv(folder / "tokenadapt.csv").iloc[0]
    assert ta["in_grid"] == 14 and ta["out_grid"] == 12 and 0 <= ta["final_token_acc"] <= 1

    fl = pd.read_csv(folder / "floors.csv").set_index("model")
    assert {"logistic regression on pixels", "logistic regression on token embeddings"} <= set(fl.index)
    assert fl.loc["logistic regression on token embeddings", "input"] == "tokens"
    arms = fl[fl.kind != "floor"]
    assert len(arms) == 5 and set(arms["input"]) == {"pixels", "tokens"}
    tok_floor = fl.loc["logistic regression on token embeddings", "top1"]
    assert arms.loc[arms.input == "tokens", "vs_logistic_floor_pts"].tolist() == \
        pytest.approx((arms.loc[arms.input == "tokens", "top1"] - tok_floor).tolist())


# ------------------------------------------------------------------------------------------------ helpers
def test_default_tokens_are_written_in_seit_format_and_read_back(idx_dir, tmp_path):
    from tokenbook import data

    bundle = data.load_data(data.DataConfig(data_dir=str(idx_dir), train_subset=40, val_subset=20))
    td = R.build_default_tokens(bundle, tmp_path / "tok", steps=2, batch_size=16, hidden=8, codebook_size=300)
    names = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"fmnist-train-token.data.bin.gz", "fmnist-train-token.index.npy.gz", "fmnist-train-label.txt",
            "fmnist-val-token.data.bin.gz", "codebook.ckpt", "codebook-synonyms.json", "tokenizer.pt"} <= names
    ids = T.tokenize_images(td.tokenizer, bundle.train.images_tensor()).numpy()
    assert np.array_equal(np.asarray(td.train.ids), ids) and td.train.grid == (14, 14)
    assert np.array_equal(td.train.labels, bundle.train.labels) and len(td.val) == 20
    assert td.codebook.shape == (300, 32) and len(td.synonyms) == 300 and len(td.synonyms["0"]) == 5
    # the same files through the release reader path
    again = T.read_token_file(T.token_file_paths(tmp_path / "tok", "fmnist", "train"))
    assert np.array_equal(np.asarray(again.ids), ids)


def test_release_reader_finds_codebook_and_synonyms(tmp_path):
    root = R.write_tiny_release(tmp_path / "rel", n_train=6, n_val=3, num_classes=3)
    td = R.load_release_tokens(root, cache=False)
    assert td.grid == (32, 32) and td.codebook.shape == (391, 32) and td.num_classes == 3
    assert int(np.max(td.train.ids)) == 390                                      # escape-coded ids survive
    assert td.files["synonyms"].name == "synonyms.json"
    sub = R.load_release_tokens(root, train_subset=4, cache=False)
    assert len(sub.train) == 4
    st = R.release_storage_table(td)
    assert st.loc[st.format == "tokens (train files on disk)", "n_images"].iloc[0] == 6
    (root / "codebook.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="codebook.ckpt"):
        R.load_release_tokens(root, cache=False)


def test_cpu_profile_is_the_workbooks_cpu_scale():
    """issue 19: 10,000 / 2,000 Fashion-MNIST images of 10 classes at 28 px, width-64 depth-6 classifiers that see 16
    tokens (the pixel ViT's 7 px patches; the token ViT's 4x4 grid after its stride-2 stem on an 8x8 crop of the
    8x8 ids of the padded 32 px image), 00's recipe, 3 paired seeds, runs through the store in 2 processes."""
    import timm

    p = _params("cpu")
    assert (p["dataset"], p["train_subset"], p["val_subset"], p["img_size"]) == ("fashion_mnist", 10000, 2000, 28)
    assert (p["batch_size"], p["lr"], p["weight_decay"], p["warmup_epochs"], p["label_smoothing"]) == \
        (128, 0.002, 0.05, 1.0, 0.1)
    assert p["epochs"] >= 15 and p["executor"] == "processes" and len(p["seeds"]) >= 3 and p["fit_floors"]
    assert R.train_config(p, "pixel").cutmix == 0.0 and R.train_config(p, "pixel").label_smoothing == 0.1
    px = timm.create_model(p["pixel_model"], num_classes=10, img_size=p["img_size"], device="meta")
    tk = timm.create_model(p["token_model"], num_classes=10, img_size=p["crop"], device="meta")
    assert px.patch_embed.num_patches == tk.patch_embed.num_patches == 16
    assert px.embed_dim == tk.embed_dim == 64 and len(px.blocks) == len(tk.blocks) == 6
    assert (28 + 2 * p["tokenizer_pad"]) // p["tokenizer_downsample"] == 8 and p["crop"] == 8


def test_cpu_recipe_is_the_sweeps_chosen_row():
    """issue 19: the cpu profile's recipe is the row the sweep chose (RECIPE_SWEEP, shown by the notebook), a row
    above the token floor and plateaued; the pixel arm under the same epochs and drop path is above its floor too."""
    p = _params("cpu")
    table = R.recipe_sweep_table()
    chosen = table[table["chosen"]]
    assert len(chosen) == 1 and bool(chosen["usable"].iloc[0]) and chosen["arm"].iloc[0] == "seit"
    row = chosen.iloc[0]
    for k in ("token_eda", "rrc_scale_min", "emb_noise", "token_cutmix", "epochs", "lr", "drop_path"):
        assert p[k] == row[k], k
    assert row["vs_floor_pts"] > 0 and row["last20_gain_pts"] < 0.5 and row["floor"] == R.SWEEP_TOKEN_FLOOR
    px = table[table["arm"].eq("pixel")].iloc[0]
    assert px["usable"] and (px["epochs"], px["drop_path"]) == (p["epochs"], p["drop_path"])
    base = table.iloc[0]
    assert not base["usable"] and base["vs_floor_pts"] < 0          # the recipe before: a failed run
    h = R.make_hook("seit", torch.randn(391, 32), 10, 8, None, p["rrc_scale_min"], emb_noise=p["emb_noise"],
                    cutmix=p["token_cutmix"], label_smoothing=p["token_label_smoothing"])
    assert h.mix is None and h.rrc_scale == (1.0, 1.0) and h.color.noise.std == 0.1 and h.label_smoothing == 0.1
    t = R._hook_settings(p)
    assert (t["cutmix"], t["label_smoothing"], t["emb_noise"]) == (0.0, 0.1, 0.1)


def test_train_config_and_hooks_per_variant():
    p = _params("smoke")
    assert R.train_config(p, "pixel").cutmix == 1.0 and R.train_config(p, "pixel").label_smoothing == 0.1
    for v in ("seit", "seit_ca", "seit_ta", "seit_ta_ca"):
        c = R.train_config(p, v)
        assert (c.mixup, c.cutmix, c.label_smoothing) == (0.0, 0.0, 0.0)
    assert R.parse_variants(["seit", "pixel"]) == ["seit", "pixel"]
    with pytest.raises(ValueError, match="unknown variants"):
        R.parse_variants(["seit", "foo"])
    cb = torch.randn(391, 32)
    ta = S.TokenAdapt(in_grid=14, out_grid=12, dim=32, heads=2, dim_head=16)
    assert R.make_hook("seit", cb, 10, 12, None).tokenadapt is None
    assert R.make_hook("seit", cb, 10, 12, None).color.coloradapt_prob == 0
    assert R.make_hook("seit", cb, 10, 12, None).color.noise.std == 1.0                 # SeiT's N(0, 1)
    scaled = R.make_hook("seit_ca", cb, 10, 12, None, emb_noise=0.25).color.noise
    assert (scaled.std, scaled.scale) == (0.25, 0.25)
    with pytest.raises(ValueError, match="emb_noise"):
        R.make_hook("seit", cb, 10, 12, None, emb_noise=-1.0)
    assert R.make_hook("seit_ca", cb, 10, 12, None).color.coloradapt_prob == 0.25
    assert R.make_hook("seit_ta", cb, 10, 12, ta).tokenadapt is ta
    assert R.make_hook("seit_ta", cb, 10, 12, ta).color.coloradapt_prob == 0
    mixed = R.make_hook("seit_ta", cb, 10, 12, ta).mix_ta  # the TokenAdapt half's Mixup 0.8 / CutMix 1.0 ...
    assert (mixed.mixup_alpha, mixed.cutmix_alpha) == (0.8, 1.0)
    assert R.make_hook("seit_ta", cb, 10, 12, ta, ta_mix=False).mix_ta is None  # ... off with ta_mix=False
    assert R._hook_settings({"crop": 12, "ta_mix": False})["ta_mix"] is False
    with pytest.raises(ValueError, match="TokenAdapt"):
        R.make_hook("seit_ta_ca", cb, 10, 12, None)
    # a batch of single-code maps (black backgrounds) stays finite with the hook's ColorAdapt epsilon
    hook = R.make_hook("seit_ca", cb, 10, 12, None)
    hook.color.noise_prob, hook.color.coloradapt_prob = 0.0, 1.0
    x, t = hook(torch.zeros(8, 14, 14, dtype=torch.long), torch.arange(8) % 10)
    assert torch.isfinite(x).all() and x.shape == (8, 32, 12, 12)



@pytest.mark.notebook
def test_smoke_claims_have_evidence_and_verdicts_over_all_seeds(smoke_results):
    from tokenbook import claims as C

    record, folder = smoke_results(NB)
    seeds = C.parse_seeds(_params("smoke")["seeds"])
    assert len(seeds) == 2
    sheet = C.load_claims("seit")
    testable = {c.id for c in sheet if not c.not_testable_here}
    ev = {e["claim"]: e for e in json.loads((folder / "claims_evidence.json").read_text())}
    assert set(ev) == testable
    for cid in R.CLAIM_ARMS:
        assert len(ev[cid]["a"]) == len(ev[cid]["b"]) == len(seeds) and ev[cid]["scale"] and ev[cid]["plateau"]
    photos = pd.read_csv(folder / "photo_storage.csv")
    pooled = 100.0 * photos["token_bytes"].sum() / photos["jpeg_file_bytes"].sum()  # the dataset-level ratio
    assert ev["seit.storage_under_1pct"]["value"] == pytest.approx(pooled) and not ev["seit.storage_under_1pct"]["a"]
    assert "per photo" in ev["seit.storage_under_1pct"]["detail"]
    table = pd.read_csv(folder / "claims.csv").set_index("claim")
    assert set(table.index) == {c.id for c in sheet}
    assert table["verdict"].isin(["reproduced", "contradicted", "inconclusive", "failed", "not_testable_here"]).all()
    # two training steps leave the pixel ViT below the logistic floor of its pixels: that claim is a failed run
    fl = pd.read_csv(folder / "floors.csv").set_index("model")
    if (runs_px := pd.read_csv(folder / "ablation_runs.csv").query("variant == 'pixel'"))["top1"].min() < \
            fl.loc["logistic regression on pixels", "top1"]:
        assert table.loc["seit.tokens_approach_pixels", "verdict"] == "failed"
        assert "pixels logistic-regression floor" in table.loc["seit.tokens_approach_pixels", "detail"]
    assert len(runs_px) == len(seeds)
    assert (table.loc[list(R.CLAIM_ARMS), "n"] == len(seeds)).all()
    assert table.loc["seit.storage_under_1pct", "n"] == 1  # one exact value against the bound, no interval
    assert pd.isna(table.loc["seit.storage_under_1pct", "ci_low"])
    runs = pd.read_csv(folder / "ablation_runs.csv")
    assert sorted(set(runs["seed"])) == seeds and len(runs) == 5 * len(seeds)
    ab = pd.read_csv(folder / "ablation.csv").set_index("variant")
    assert (ab["n_seeds"] == len(seeds)).all() and (ab["seeds"] == "0,1").all()
    assert ab.loc["pixel", "top1"] == pytest.approx(runs.loc[runs.variant == "pixel", "top1"].mean())


def _runs(values: dict) -> pd.DataFrame:
    rows = [{"seed": s, "variant": v, "model": R.PAPER_LABELS[v], "input": R.VARIANTS[v][0], "top1": t, "top5": 90.0,
             "train_wall_s": 1.0, "gain_vs_seit_pts": 0.0} for v, per in values.items() for s, t in per.items()]
    return pd.DataFrame(rows)


def test_seed_summary_means_intervals_and_paired_gains():
    from scipy import stats

    runs = _runs({"seit": {0: 40.0, 1: 50.0, 2: 45.0}, "seit_ta": {0: 41.0, 1: 52.0, 2: 45.0}})
    s = R.seed_summary(runs).set_index("variant")
    assert s.loc["seit", "top1"] == pytest.approx(45.0) and s.loc["seit", "n_seeds"] == 3
    half = stats.t.ppf(0.975, 2) * 5.0 / math.sqrt(3)                           # sd of 40, 50, 45 is 5
    assert s.loc["seit", "top1_ci_low"] == pytest.approx(45.0 - half)
    assert s.loc["seit_ta", "top1_per_seed"] == "41.00, 52.00, 45.00" and s.loc["seit_ta", "seeds"] == "0,1,2"
    # paired: the per-seed differences 1, 2, 0 (mean 1, sd 1), not the difference of unpaired means' intervals
    assert s.loc["seit_ta", "gain_vs_seit_pts"] == pytest.approx(1.0)
    assert s.loc["seit_ta", "gain_ci_high"] == pytest.approx(1.0 + stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert s.loc["seit", "gain_vs_seit_pts"] == 0 and s.loc["seit", "gain_ci_low"] == 0
    one = R.seed_summary(_runs({"seit": {0: 40.0}})).iloc[0]
    assert one["top1"] == 40 and math.isnan(one["top1_ci_low"])


def test_claims_evidence_pairs_arms_by_seed_and_skips_missing_arms():
    runs = _runs({"pixel": {0: 60.0, 1: 62.0}, "seit": {1: 45.0, 0: 44.0}, "seit_ca": {0: 43.0, 1: 46.0}})
    hist = {(v, s): pd.DataFrame({"val_top1": [10.0, 20.0 + s]}) for v in ("pixel", "seit", "seit_ca") for s in (0, 1)}
    ev = {e.claim: e for e in R.claims_evidence(runs, hist, "tiny")}
    assert set(ev) == {"seit.tokens_approach_pixels", "seit.coloradapt_gain"}   # no TokenAdapt runs: no evidence
    assert ev["seit.tokens_approach_pixels"].a == [60.0, 62.0] and ev["seit.tokens_approach_pixels"].b == [44.0, 45.0]
    assert ev["seit.coloradapt_gain"].a == [43.0, 46.0] and ev["seit.coloradapt_gain"].scale == "tiny"
    assert ev["seit.coloradapt_gain"].plateau.startswith("no")                   # +10 / +11 pt over the last epoch


def test_photo_storage_accounting(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat.jpg"
    Image.new("RGB", (300, 280), (120, 30, 200)).save(flat, quality=90)
    noisy = tmp_path / "noisy.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 400, 3), dtype=np.uint8)).save(noisy, quality=90)
    df = R.photo_storage([flat, noisy], kmeans_iters=3).set_index("photo")
    assert df.loc["flat.jpg", "jpeg_file_bytes"] == flat.stat().st_size and df.loc["flat.jpg", "native_size"] == "300x280"
    assert df.loc["flat.jpg", "codes_used"] == 1 and df.loc["flat.jpg", "escape_bytes"] in (1024, 2048)
    assert df.loc["noisy.jpg", "codes_used"] > 100 and df.loc["noisy.jpg", "escape_bytes"] >= 1024
    assert (df["token_bytes"] < df["max_bytes"]).all() and (df["max_bytes"] == 2056).all()
    assert df.loc["flat.jpg", "token_bytes"] < 60 < df.loc["noisy.jpg", "token_bytes"]   # gzip sees the repeats
    assert df["pct_of_jpeg"].tolist() == pytest.approx((100 * df["token_bytes"] / df["jpeg_file_bytes"]).tolist())
    assert R.photo_storage([flat, noisy], kmeans_iters=3).equals(df.reset_index())      # deterministic
    assert [p.name for p in R.sample_photos()] == ["china.jpg", "flower.jpg", "grace_hopper.jpg"]


def test_paper_tables_never_subtract_accuracies_of_different_data():
    summary = pd.DataFrame([{"variant": v, "model": R.PAPER_LABELS[v], "input": R.VARIANTS[v][0],
                             "storage_bytes_per_image": 10.0, "top1": 80.0 + i, "gain_vs_seit_pts": i - 1.0}
                            for i, v in enumerate(R.VARIANTS)])
    long = R.ablation_vs_paper(summary)
    assert long.loc[long.metric != "gain_vs_seit_pts", "diff"].isna().all()
    gain = long[(long.metric == "gain_vs_seit_pts") & (long.model == "SeiT + TokenAdapt")].iloc[0]
    assert gain["paper"] == 3.1 and gain["diff"] == pytest.approx(2.0 - 3.1)
    assert not (long.paper.isna() & long.ours.isna()).any()
    wide = R.accuracy_vs_storage(summary).set_index("model")
    assert math.isnan(wide.loc["SeiT", "paper_gain_vs_seit_pts"])


# ------------------------------------------------------------------------------------------------ full recipe
def test_full_profile_is_seits_recipe():
    p = _params("full")
    assert p["token_source"].startswith("release:") and p["tokenadapt_ckpt"].endswith("tokenadapt.ckpt")
    assert p["token_model"] == "deit_base_token_32" and p["crop"] == 28
    assert p["batch_size"] * p["devices"] == 1024 and p["lr"] == pytest.approx(7.5e-4 * 1024 / 512)
    assert (p["epochs"], p["weight_decay"], p["min_lr"], p["drop_path"]) == (300, 0.1, 1e-5, 0.1)
    assert p["ema_decay"] == 0.99996 and p["precision"] == "bf16-mixed" and p["strategy"].startswith("ddp")
    assert R.parse_variants(p["variants"]) == ["seit", "seit_ta_ca"]
    seit, ta = R.train_config(p, "seit"), R.train_config(p, "seit_ta_ca")
    assert seit.warmup_epochs == 5 and ta.warmup_epochs == 30
    assert (seit.opt, seit.lr, seit.weight_decay, seit.epochs, seit.devices) == ("adamw", 1.5e-3, 0.1, 300, 8)
    m = timm.create_model(p["token_model"], num_classes=1000, img_size=p["crop"], drop_path_rate=p["drop_path"],
                          device="meta")
    assert m.patch_embed.num_patches == 196 and m.in_chans == 32


def test_full_recipe_runs_one_step_on_a_tiny_token_release(tmp_path):
    """The full profile's hyper-parameters on a tiny release (ids written by the writer) with an official-size
    TokenAdapt checkpoint; only the model width (ViT-Ti instead of ViT-B, same 32x28x28 input), the step count and
    the device settings (one CPU process, no loader workers) are overridden."""
    root = R.write_tiny_release(tmp_path / "rel", n_train=8, n_val=4, num_classes=4)
    torch.save({"model": S.TokenAdapt().state_dict()}, tmp_path / "tokenadapt.ckpt")   # official sizes
    p = _params("full", token_source=f"release:{root}", tokenadapt_ckpt=str(tmp_path / "tokenadapt.ckpt"),
                token_model="deit_tiny_token_32", epochs=1, max_steps_per_epoch=1, batch_size=4, devices=1,
                strategy="auto", accelerator="cpu", precision="32-true", num_workers=0)
    td = R.load_release_tokens(p["token_source"].split(":", 1)[1], cache=False)
    ta = S.load_tokenadapt(p["tokenadapt_ckpt"])
    assert (ta.in_grid, ta.out_grid, ta.codebook_size) == (32, 28, 391)
    for v in R.parse_variants(p["variants"]):
        row, res = R.run_variant(v, p, td, None, ta)
        assert row["steps"] == 1 and row["input_shape"] == "32x28x28" and 0 <= row["top1"] <= 100
        assert res.config.warmup_epochs == (30 if v == "seit_ta_ca" else 5) and res.config.ema_decay == 0.99996
        assert math.isfinite(res.history["train_loss"].iloc[0]) and "ema_top1" in res.history


def test_claims_commentary_names_the_unsupported_claims_with_numbers():
    rows = [{"claim": "seit.tokenadapt_gain", "kind": "empirical", "verdict": "contradicted", "ours": -3.2,
             "ci_low": -4.0, "ci_high": -2.4, "n": 3},
            {"claim": "seit.coloradapt_gain", "kind": "empirical", "verdict": "reproduced", "ours": 1.0,
             "ci_low": 0.5, "ci_high": 1.5, "n": 3},
            {"claim": "seit.imagenet_storage_gb", "kind": "structural", "verdict": "not_testable_here", "ours": None,
             "ci_low": None, "ci_high": None, "n": 0}]
    text = R.claims_commentary(pd.DataFrame(rows), ta_token_acc=0.48)
    assert "`seit.tokenadapt_gain` is **contradicted**" in text and "-3.20" in text and "n = 3" in text
    assert "48 %" in text and "under-trained" in text and "coloradapt" not in text
    assert "under-trained" not in R.claims_commentary(pd.DataFrame(rows), ta_token_acc=0.95)
    assert R.claims_commentary(pd.DataFrame(rows[1:])).startswith("No empirical claim")
