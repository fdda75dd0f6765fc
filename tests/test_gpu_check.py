"""scripts/gpu_check.py: its checks run on the CPU with tiny settings (the GPU run itself needs a GPU)."""
import importlib.util
import math

import pytest
import torch

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = _load()


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.main(["--out", str(tmp_path)]) == 2
    assert "refusing to run: no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.csv").exists()


def test_bf16_against_fp32_on_cpu(one_thread):
    rows = G.precision_check("vit_fm_tiny_p4_28", "cpu", batch=4)
    by = {r["check"]: r for r in rows}
    assert by["bf16"]["status"] == "pass" and 0 < by["bf16"]["value"] <= G.BF16_RTOL
    assert by["bf16_train_step"]["status"] == "pass" and math.isfinite(by["bf16_train_step"]["value"])


def test_bf16_check_catches_a_broken_model(monkeypatch, one_thread):
    """A model that is wrong under autocast (a head in the wrong place) fails the tolerance."""
    import torch.nn as nn

    class Broken(nn.Module):
        pretrained_cfg = {"input_size": (3, 8, 8)}

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(192, 10)

        def forward(self, x):
            out = self.lin(x.flatten(1))
            return out * 2 if torch.is_autocast_enabled('cpu') else out

    monkeypatch.setattr(G, "make_model", lambda name, **kw: (Broken(), (3, 8, 8)))
    rows = G.precision_check("broken", "cpu", batch=4)
    assert rows[0]["check"] == "bf16" and rows[0]["status"] == "fail"


@pytest.mark.slow
def test_compile_against_eager_on_cpu(one_thread):
    rows = G.precision_check("vit_fm_tiny_p4_28", "cpu", batch=2, compile=True)
    c = next(r for r in rows if r["check"] == "compile")
    assert c["status"] == "pass", c


def test_peak_share_arithmetic():
    assert G.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert G.peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert G.peak_bf16_tflops("NVIDIA H200") == 989
    assert G.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert G.peak_bf16_tflops("Some New GPU") is None
    # ViT-B/16: 17.6 GMACs/img; 3000 img/s -> 6 * 17.6e9 * 3000 = 316.8 TFLOP/s = 32 % of 989
    assert G.train_peak_share(17.6e9, 3000, 989) == pytest.approx(6 * 17.6e9 * 3000 / 989e12)
    assert G.train_peak_share(17.6e9, 3000, 989) == pytest.approx(0.3203, abs=1e-4)
    assert G.train_peak_share(17.6e9, 3000, None) is None


def test_train_throughput_row_on_cpu(one_thread):
    rows = G.train_throughput_check("cpu", name="vit_fm_tiny_p4_28", batch=4, steps=2, warmup=1,
                                    device_name="NVIDIA H100 80GB HBM3")
    r = rows[0]
    assert r["check"] == "train_peak" and 0 < r["value"] < 1 and "img/s" in r["note"]
    r = G.train_throughput_check("cpu", name="vit_fm_tiny_p4_28", batch=2, steps=1, warmup=0)[0]
    assert r["value"] == "unknown"


def test_latency_ratio_on_cpu(one_thread):
    rows = G.latency_check("cpu", batch=2, min_run_time=0.05, models=("vittm_cpu_m4p4_28", "vittm_cpu_m2p4_28"),
                           baseline="vit_fm_tiny_p4_28")
    assert [r["subject"] for r in rows] == ["vittm_cpu_m4p4_28 / vit_fm_tiny_p4_28",
                                            "vittm_cpu_m2p4_28 / vit_fm_tiny_p4_28"]
    assert all(r["value"] > 0 and "fp32, batch 2" in r["note"] for r in rows)


def test_ddp_skips_with_a_reason_on_one_gpu():
    r = G.ddp_check("cuda:0", n_gpus=1)[0]
    assert r["status"] == "skip" and "needs 2 GPUs" in r["note"]


def test_launcher_row_runs_the_torchrun_path_on_cpu(tmp_path):
    """The launcher check on the CPU: a probe run as a torchrun job of 2 gloo ranks, trained, then from the store."""
    (r,) = G.launcher_check("cpu", store=tmp_path / "store", nproc=2)
    assert r["status"] == "pass" and r["subject"] == "torchrun, 2 rank(s)", r
    assert "world size 2" in r["note"] and r["note"].endswith("then store")


def test_notebooks_rows_from_the_runner(tmp_path):
    (tmp_path / "00_baselines" / "smoke").mkdir(parents=True)
    (tmp_path / "00_baselines" / "smoke" / "status.json").write_text("{}")
    rows = G.notebooks_check("cuda:0", tmp_path, runner=["true"])
    by = {r["subject"]: r["status"] for r in rows}
    assert by["00_baselines"] == "pass" and by["01_vittm"] == "fail" and by["run_all.sh --profile smoke"] == "pass"


def test_table_written_atomically_as_csv_and_markdown(tmp_path):
    import csv

    rows = [G.row("bf16", "m", "pass", 0.0123, "fp32 logits", "rel L2 <= 0.05", "cuda:0", "a | b"),
            G.row("ddp", "2-process fit", "skip", note="needs 2 GPUs")]
    c, m = G.write_table(rows, tmp_path / "out")
    got = list(csv.DictReader(c.open()))
    assert [r["check"] for r in got] == ["bf16", "ddp"] and got[0]["value"] == "0.0123"
    md = m.read_text().splitlines()
    assert md[0].startswith("| check | subject | status") and len(md) == 4 and "a / b" in md[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.csv", "gpu_check.md"]  # no temp files


def test_main_on_a_faked_gpu_writes_one_table(monkeypatch, tmp_path):
    """main() with every check stubbed: one table, exit 1 when a check fails, errors become rows."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(G, "precision_check", lambda n, d, compile=False: [G.row("bf16", n, "pass", 0.01)])
    monkeypatch.setattr(G, "latency_check", lambda d: [G.row("latency", "r", "info", 0.5)])

    def boom(d, device_name=None):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(G, "train_throughput_check", boom)
    monkeypatch.setattr(G, "ddp_check", lambda d: [G.row("ddp", "x", "skip")])
    monkeypatch.setattr(G, "launcher_check", lambda d: [G.row("launcher", "torchrun, 1 rank(s)", "pass")])
    assert G.main(["--out", str(tmp_path), "--skip-notebooks"]) == 1
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| launcher |" in text
    assert "RuntimeError: no kernel" in text and text.count("| bf16 |") == len(G.FAMILY_MODELS)


def test_zero_initialized_heads_do_not_make_the_comparison_vacuous(one_thread):
    r = G.precision_check("vittm_cpu_m4p4_28", "cpu", batch=2)[0]
    assert r["status"] == "pass" and r["value"] > 0  # ViTTM's heads start at zero: logits would be equal trivially
