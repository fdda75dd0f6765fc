import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbook import bench


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


@pytest.mark.parametrize("name,gmacs", [("deit_small_patch16_224", 4.60), ("vit_base_patch16_224", 17.56),
                                        ("vit_small_patch16_224", 4.608)])
def test_published_macs_with_attention(name, gmacs):
    m = _meta(name)
    r = bench.count_macs(m, torch.randn(1, 3, 224, 224, device="meta"))
    assert r["gmacs"] == pytest.approx(gmacs, rel=0.005)
    assert r["flops"] == 2 * r["macs"]


def test_attention_is_counted_even_through_fused_sdpa():
    class Sdpa(nn.Module):
        def forward(self, x):
            q = x.view(2, 3, 50, 16)
            return F.scaled_dot_product_attention(q, q, q)

    r = bench.count_macs(Sdpa(), torch.randn(2 * 3 * 50 * 16))
    assert r["macs"] == 2 * 3 * 50 * 50 * 16 * 2  # q k^T and attn v
    # a timm model keeps its fused flag after counting
    import tokenbook.models  # noqa: F401

    m = timm.create_model("vit_fm_tiny_p4_28")
    before = [a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")]
    assert before and bench.count_macs(m, input_size=(3, 28, 28))["macs"] > 0
    assert before == [a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")]


def test_batch_scales_macs():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    one = bench.count_macs(m, input_size=(3, 32, 32))["macs"]
    four = bench.count_macs(m, input_size=(3, 32, 32), batch_size=4)["macs"]
    assert four == 4 * one


def test_param_counts_total_trainable_used():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 100)
            self.frozen = nn.Linear(3, 2)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.used(x))

    m = M()
    c = bench.count_params(m)
    assert c["total"] == 15 + 500 + 8 and c["trainable"] == 15 + 500
    assert bench.count_used_params(m, torch.randn(2, 4)) == 15 + 8
    assert not m.frozen.weight.requires_grad  # flags restored


def test_shared_parameters_counted_once():
    lin = nn.Linear(5, 5)
    m = nn.Sequential(lin, lin)
    assert bench.count_params(m)["total"] == 30


def test_latency_row_records_settings():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    r = bench.measure_latency(m, input_size=(3, 8, 8), batch_size=4, min_run_time=0.05, name="lin")
    row = r.as_row()
    assert row["model"] == "lin" and row["batch_size"] == 4 and row["device"] == "cpu" and row["dtype"] == "fp32"
    assert row["median_ms"] > 0 and row["runs"] >= 1 and row["threads"] >= 1
    assert row["throughput_img_s"] == pytest.approx(4 / (row["median_ms"] / 1e3))


def test_efficiency_table_ratios_from_one_run():
    small = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    big = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    df = bench.efficiency_table({"small": small, "big": big}, input_size=(3, 32, 32), min_run_time=0.05,
                                baseline="big", used_params=True)
    assert list(df["model"]) == ["small", "big"]
    assert df.loc[1, "macs_ratio_vs_big"] == 1.0 and df.loc[0, "macs_ratio_vs_big"] > 1.5
    assert df.loc[1, "speedup_vs_big"] == 1.0
    assert df.loc[0, "used_params_m"] <= df.loc[0, "params_m"]
    with pytest.raises(ValueError, match="baseline"):
        bench.efficiency_table({"a": small}, input_size=(3, 32, 32), latency=False, baseline="zzz")


def test_train_step_measure():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    r = bench.measure_train_step(m, input_size=(3, 32, 32), batch_size=4, steps=2, warmup=1)
    assert r["step_ms"] > 0 and r["train_img_s"] > 0


def test_interleaved_ratio_sees_a_known_ratio():
    import time as _t

    from tokenbook.bench import interleaved_ratio

    r = interleaved_ratio(lambda: _t.sleep(0.006), lambda: _t.sleep(0.002), repeats=7, warmup=1)
    assert r["q1"] <= r["ratio"] <= r["q3"] and 2.0 < r["ratio"] < 3.6 and r["repeats"] == 7
    with pytest.raises(ValueError):
        interleaved_ratio(lambda: None, lambda: None, repeats=2)
