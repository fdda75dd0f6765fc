import functools
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from tokenbook import repro
from tokenbook.train import (CheckpointMismatchError, TrainConfig, TrainingDivergedError, evaluate, fit, load_weights,
                             recipe, save_weights)


def _easy_data(n=256, classes=4, seed=0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y % 3, :, y // 3] += shift  # class-dependent bright column
    return torch.utils.data.TensorDataset(x, y)


def _loaders(bs=32, seed=0, n=256):
    ds = _easy_data(n)
    tl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True,
                                     generator=repro.loader_generator(seed))
    vl = torch.utils.data.DataLoader(_easy_data(128, seed=1), batch_size=64)
    return tl, vl


def _tiny_vit(classes=4, seed=0):
    repro.seed_everything(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=classes)


CFG = dict(epochs=3, lr=3e-3, warmup_epochs=0.5, progress=False, accelerator="cpu")


def test_fit_learns_and_reports():
    tl, vl = _loaders()
    r = fit(_tiny_vit(), tl, vl, TrainConfig(**CFG))
    h = r.history
    assert list(h["epoch"]) == [1, 2, 3]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert r.final["val_top1"] > 60  # chance is 25
    assert r.timing["step_time_s"] > 0 and r.timing["wall_time_s"] >= r.timing["step_time_s"]
    assert r.timing["steps"] == 3 * 8
    # per-step cosine schedule reaches min_lr at the end
    assert h["lr"].iloc[-1] == pytest.approx(1e-6, abs=1e-6)


def test_warmup_in_steps_and_cosine_per_step():
    tl, vl = _loaders()
    seen = []

    class Spy:
        def on_batch(self, batch):
            return batch

        def on_epoch_end(self, epoch, model, metrics):
            seen.append(metrics["lr"])

    cfg = TrainConfig(**{**CFG, "epochs": 2, "warmup_steps": 4, "warmup_lr": 1e-5, "min_lr": 1e-4})
    fit(_tiny_vit(), tl, None, cfg, hooks=[Spy()])
    # after 8 of 16 updates: cosine at t=8 of 16 -> midway between lr and min_lr
    assert seen[0] == pytest.approx(1e-4 + 0.5 * (3e-3 - 1e-4), rel=1e-6)


class TwoHeads(nn.Module):
    head_names = ("memory", "process")

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        self.num_classes = 4

    def forward(self, x):
        return self.a(x), self.b(x)


def test_multi_head_loss_is_summed_and_reported_per_head():
    tl, vl = _loaders()
    m = TwoHeads()
    r = fit(m, tl, vl, TrainConfig(**CFG))
    for k in ("val_top1_memory", "val_top1_process", "val_top5_memory"):
        assert k in r.final
    assert r.final["val_top1"] == r.final["val_top1_memory"]
    # summed loss: at init both heads are ~log(4), so the first logged loss is about twice that
    m2 = TwoHeads()
    x, y = next(iter(tl))
    with torch.no_grad():
        a, b = m2(x)
        expect = nn.functional.cross_entropy(a, y) + nn.functional.cross_entropy(b, y)
    assert expect > 2.0  # two heads' losses


def test_hooks_called_in_order_with_state():
    tl, vl = _loaders()
    calls = []

    class Hook:
        def __init__(self):
            self.n = 0

        def on_fit_start(self, fabric, model):
            calls.append("start")

        def on_epoch_start(self, epoch, model):
            calls.append(f"epoch{epoch}")

        def on_batch(self, batch):
            self.n += 1
            x, y = batch
            return x * 0 + x, y

        def on_epoch_end(self, epoch, model, metrics):
            calls.append(f"end{epoch}:{'val_top1' in metrics}")

        def state_dict(self):
            return {"n": self.n}

    h = Hook()
    fit(_tiny_vit(), tl, vl, TrainConfig(**{**CFG, "epochs": 2}), hooks=[h])
    assert calls == ["start", "epoch0", "end0:True", "epoch1", "end1:True"]
    assert h.n == 16


def test_only_trainable_parameters_change():
    tl, vl = _loaders()
    m = _tiny_vit()
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("head"))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    r = fit(m, tl, None, TrainConfig(**{**CFG, "epochs": 1}))
    assert r.trainable_params == sum(p.numel() for n, p in m.named_parameters() if n.startswith("head"))
    for n, p in m.named_parameters():
        same = torch.equal(before[n], p.detach())
        assert same != n.startswith("head"), n


def test_mixup_bce_ema_clip_run():
    tl, vl = _loaders()
    cfg = TrainConfig(**{**CFG, "epochs": 1, "mixup": 0.8, "cutmix": 1.0, "loss": "bce", "ema_decay": 0.9,
                         "clip_grad": 1.0, "label_smoothing": 0.1})
    r = fit(_tiny_vit(), tl, vl, cfg)
    assert r.ema is not None and "ema_top1" in r.final and math.isfinite(r.final["train_loss"])


class _goes_bad(nn.Module):
    """A linear classifier whose output turns non-finite (times ``factor``) on forward call ``at_call``."""
    num_classes = 4

    def __init__(self, at_call: int, factor: float):
        super().__init__()
        self.lin = nn.Linear(192, 4)
        self.calls, self.at_call, self.factor = 0, at_call, factor

    def forward(self, x):
        self.calls += 1
        out = self.lin(x.flatten(1))
        return out * self.factor if self.calls == self.at_call else out


def test_nan_loss_stops_with_step_and_lr():
    tl, _ = _loaders()

    Bad = functools.partial(_goes_bad, at_call=2, factor=float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2 \(global step 2\) with configured lr 0\.003 "):
        fit(Bad(), tl, None, TrainConfig(**CFG))


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    tl, vl = _loaders()
    full = fit(_tiny_vit(), tl, vl, TrainConfig(**{**CFG, "epochs": 3, "ema_decay": 0.9}))

    class StopAfter:
        def on_epoch_end(self, epoch, model, metrics):
            if epoch == 1:
                raise KeyboardInterrupt

    ck = str(tmp_path / "ck")
    tl, vl = _loaders()
    with pytest.raises(KeyboardInterrupt):
        fit(_tiny_vit(), tl, vl, TrainConfig(**{**CFG, "epochs": 3, "ema_decay": 0.9, "checkpoint_dir": ck}),
            hooks=[StopAfter()])
    # only epoch 0 was checkpointed (the interrupt happened in epoch 1's end hook, before its checkpoint)
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 0
    tl, vl = _loaders()
    resumed = fit(_tiny_vit(seed=123), tl, vl,
                  TrainConfig(**{**CFG, "epochs": 3, "ema_decay": 0.9, "checkpoint_dir": ck, "resume": True}))
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert list(resumed.history["epoch"]) == [1, 2, 3]
    # the timing covers all three epochs (the first one's from its history row), and says where the run resumed
    t, h = resumed.timing, resumed.history
    assert t["resumed_at_epoch"] == 1 and full.timing["resumed_at_epoch"] is None
    assert t["steps"] == full.timing["steps"] == int(h["steps"].sum())
    assert t["step_time_s"] == pytest.approx(float(h["step_time_s"].sum()))
    assert t["wall_time_s"] >= float(h["epoch_time_s"].iloc[0])


def test_resume_refuses_other_epoch_count(tmp_path):
    tl, vl = _loaders()
    ck = str(tmp_path / "ck")
    fit(_tiny_vit(), tl, None, TrainConfig(**{**CFG, "epochs": 1, "checkpoint_dir": ck}))
    with pytest.raises(ValueError, match="epoch"):
        fit(_tiny_vit(), tl, None, TrainConfig(**{**CFG, "epochs": 2, "checkpoint_dir": ck, "resume": True}))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_and_mismatch(tmp_path, suffix):
    m = _tiny_vit()
    p = save_weights(m, tmp_path / f"w{suffix}")
    m2 = _tiny_vit(seed=5)
    assert load_weights(m2, p) == {"missing": [], "unexpected": [], "shape_mismatch": []}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    other = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                              num_classes=7)
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(other, p)
    msg = str(e.value)
    assert "missing keys: blocks.2" in msg and "head.weight" in msg


def test_evaluate_counts_top5():
    tl, vl = _loaders()
    m = _tiny_vit(classes=10)
    r = evaluate(m, vl)
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["n"] == 128


def test_same_seed_same_history():
    def run():
        tl, vl = _loaders(seed=7)
        return fit(_tiny_vit(seed=7), tl, vl, TrainConfig(**{**CFG, "epochs": 2, "seed": 7})).history

    a, b = run(), run()
    cols = [c for c in a.columns if "time" not in c]
    assert a[cols].equals(b[cols])


def test_reused_loader_gives_the_same_run():
    tl, vl = _loaders(seed=3)
    a = fit(_tiny_vit(seed=3), tl, None, TrainConfig(**{**CFG, "epochs": 2}))
    b = fit(_tiny_vit(seed=3), tl, None, TrainConfig(**{**CFG, "epochs": 2}))
    assert a.history["train_loss"].tolist() == b.history["train_loss"].tolist()


def test_bad_config():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="recipe"):
        recipe("nope")
    assert recipe("deit_in1k").mixup == 0.8


DDP_SCRIPT = textwrap.dedent('''
    import json, sys, torch, timm
    from lightning_fabric import Fabric
    from tokenbook import repro
    from tokenbook.train import TrainConfig, fit
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(128) % 4
    x = torch.randn(128, 3, 8, 8, generator=g)
    x[torch.arange(128), y % 3, :, y // 3] += 2.0
    ds = torch.utils.data.TensorDataset(x, y)
    tl = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, drop_last=True)
    vl = torch.utils.data.DataLoader(ds, batch_size=32)
    repro.seed_everything(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                          num_classes=4)
    r = fit(m, tl, vl, TrainConfig(epochs=2, lr=3e-3, progress=False), fabric=fabric)
    w = sum(p.double().sum().item() for p in r.model.parameters())
    # one file per rank: two processes printing to one pipe can interleave their lines
    with open(f"result_rank{fabric.global_rank}.json", "w") as f:
        json.dump({"rank": fabric.global_rank, "world": fabric.world_size, "w": w,
                   "steps": r.timing["steps"], "n": r.final.get("val_top1")}, f)
''')


def test_ddp_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    rows = [json.loads((tmp_path / f"result_rank{k}.json").read_text()) for k in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 for r in rows)
    # 128 samples / 2 ranks / batch 16 = 4 steps per epoch per rank; weights stay in sync across ranks
    assert all(r["steps"] == 8 for r in rows)
    assert rows[0]["w"] == pytest.approx(rows[1]["w"], rel=1e-9)
    assert rows[0]["n"] == rows[1]["n"]  # metrics are all-reduced


def test_bf16_mixed_precision_on_cpu():
    tl, vl = _loaders()
    r = fit(_tiny_vit(), tl, vl, TrainConfig(**{**CFG, "epochs": 1, "precision": "bf16-mixed"}))
    assert r.timing["precision"] == "bf16-mixed" and math.isfinite(r.final["train_loss"])
    assert next(r.model.parameters()).dtype == torch.float32  # master weights stay fp32


NOTEBOOK_DDP_SCRIPT = textwrap.dedent('''
    import json, torch, timm
    from tokenbook import repro
    from tokenbook.train import TrainConfig, fit_launched
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = torch.randn(64, 3, 8, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    tl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True)
    repro.seed_everything(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          num_classes=4)
    before = sum(p.double().sum().item() for p in m.parameters())
    r = fit_launched(m, tl, tl, TrainConfig(epochs=1, lr=3e-3, progress=False, accelerator="cpu", devices=2,
                                            strategy="ddp_notebook", ema_decay=0.9))
    after = sum(p.double().sum().item() for p in m.parameters())
    print("RESULT", json.dumps({"world": r.timing["world_size"], "steps": r.timing["steps"], "changed": before != after,
                                "same_obj": r.model is m, "ema": r.ema is not None, "top1": r.final.get("val_top1")}))
''')


def test_fit_launched_forks_workers_like_a_notebook(tmp_path):
    """ddp_notebook: what a Jupyter kernel can start; the trained weights come back into the caller's model."""
    script = tmp_path / "nb_ddp.py"
    script.write_text(NOTEBOOK_DDP_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT ")).split("RESULT ", 1)[1])
    # 64 samples / 2 ranks / batch 8 = 4 steps on rank 0; the caller's model holds the trained weights
    assert r["world"] == 2 and r["steps"] == 4 and r["changed"] and r["same_obj"] and r["ema"]
    assert r["top1"] is not None


# ----------------------------------------------------------------------------------------------------------
# GPU path: no per-step host sync; divergence is an error (issues 11 item 7, 13)
# ----------------------------------------------------------------------------------------------------------
def _count_host_syncs(monkeypatch):
    """Count, during a fit, the calls that block the host on the device: ``torch.cuda.synchronize``, the engine's
    ``_sync`` and every Tensor -> Python conversion (``item``, ``bool``, ``float``, ``int``, ``tolist``) made from
    ``tokenbook/train.py`` itself (torch's and timm's own CPU-side bookkeeping is not the engine's hot path)."""
    import tokenbook.train as T

    calls = []
    here = T.__file__

    def wrap(owner, name, always=False):
        orig = getattr(owner, name)

        def spy(*a, **k):
            if always or sys._getframe(1).f_code.co_filename == here:
                calls.append(name)
            return orig(*a, **k)

        monkeypatch.setattr(owner, name, spy)

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        wrap(torch.Tensor, name)
    wrap(torch.cuda, "synchronize", always=True)
    wrap(T, "_sync", always=True)
    return calls


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fit_has_no_per_step_host_sync(monkeypatch, one_thread, grad_accum):
    tl, vl = _loaders(bs=8)  # 32 batches per epoch
    counts = {}
    for steps in (4, 32):
        calls = _count_host_syncs(monkeypatch)
        fit(_tiny_vit(), tl, vl, TrainConfig(**{**CFG, "epochs": 2, "max_steps_per_epoch": steps // grad_accum,
                                                "grad_accum": grad_accum}))
        counts[steps] = len(calls)
        monkeypatch.undo()
    # O(epochs), not O(steps): 8x the steps, the same number of host syncs
    assert counts[32] == counts[4], counts
    assert counts[32] <= 2 * 8, counts  # a handful per epoch (timing window, loss check, evaluation)


def test_nan_found_late_still_names_its_step():
    """The finiteness check runs once per window of steps, but the error names the step that went non-finite."""
    tl, _ = _loaders()

    BadAt5 = functools.partial(_goes_bad, at_call=13, factor=float("inf"))

    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 5 \(global step 13\) with configured lr") as e:
        fit(BadAt5(), tl, None, TrainConfig(**{**CFG, "finite_check_every": 100}))
    assert "the loss first became " in str(e.value)


def test_finite_check_every_validated():
    with pytest.raises(ValueError, match="finite_check_every"):
        TrainConfig(finite_check_every=0)


def test_absurd_lr_fails_in_validation_naming_the_epoch(one_thread):
    """lr=1e9: one step leaves the training loss finite, the validation loss is NaN -> an error, not 'n/a'."""
    tl, vl = _loaders()
    cfg = TrainConfig(**{**CFG, "epochs": 1, "lr": 1e9, "warmup_epochs": 0, "max_steps_per_epoch": 1})
    with pytest.raises(TrainingDivergedError, match=r"validation of the model after epoch 1 \(global step 1\) with "
                       r"configured lr 1e\+09 .*loss") as e:
        fit(_tiny_vit(), tl, vl, cfg)
    assert "\n" not in str(e.value)


def test_absurd_lr_fails_in_training_naming_the_epoch(one_thread):
    tl, _ = _loaders()
    cfg = TrainConfig(**{**CFG, "epochs": 1, "lr": 1e9, "warmup_epochs": 0})
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step \d+ .*configured lr 1e\+09"):
        fit(_tiny_vit(), tl, None, cfg)


def test_huge_lr_names_the_configured_lr_and_the_first_bad_step(one_thread):
    """Issue 22: with a warmup (and a cosine down to min_lr 1e-6) the error names the configured peak lr, not the
    schedule's value at one step, and the epoch / global step where the loss first became non-finite; one line."""
    tl, vl = _loaders()
    cfg = TrainConfig(**{**CFG, "lr": 1e9, "finite_check_every": 100})
    with pytest.raises(TrainingDivergedError) as e:
        fit(_tiny_vit(), tl, vl, cfg)
    msg = str(e.value)
    assert "\n" not in msg and "configured lr 1e+09" in msg and "1e-06" not in msg
    m = re.search(r"loss first became (nan|inf|-inf) at epoch (\d+), step (\d+) \(global step (\d+)\)", msg)
    assert m and m.group(2) == "1" and m.group(3) == m.group(4), msg  # in epoch 1, step == global step
    # (that it is the *first* bad step, later ones being NaN too: test_nan_found_late_still_names_its_step)


def test_evaluate_refuses_non_finite_loss():
    _, vl = _loaders()
    m = _tiny_vit()
    with torch.no_grad():
        m.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"non-finite.*loss"):
        evaluate(m, vl)


def test_cuda_step_timer_logic_without_a_gpu(monkeypatch):
    """The CUDA path of the step timer (events, read once per epoch) with fake events, so it is tested on CPU."""
    import tokenbook.train as T

    made = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None
            self.synced = False
            made.append(self)

        def record(self, stream=None):
            self.t = len(made) * 10.0  # ms: a step's two events are 10 ms apart

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = T._StepTimer(torch.device("cuda", 0))
    for _ in range(5):
        timer.start()
        timer.stop()
    assert not any(e.synced for e in made)  # nothing waited for the device during the steps
    assert timer.total() == pytest.approx(5 * 0.010)
    assert made[-1].synced and timer.total() == 0.0  # read once, then reset for the next epoch
