"""fit_ensemble (issue 19, item 5): K seeds trained batched end where each would alone under train.fit."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tokenbook.ensemble import _clip_per_member, fit_ensemble, member_grad_norms
from tokenbook.train import TrainConfig, TrainingDivergedError, fit

SEEDS = [3, 7, 11]
#: measured: max |delta| 1.3e-5 .. 1.7e-5 after 12 AdamW steps at lr 3e-3 without clipping, 3e-7..5e-7 with clipping
#: + Mixup/CutMix + label smoothing + EMA (batched matmuls and explicit attention sum in another order than fit's
#: single-model kernels; Adam's m / sqrt(v) amplifies those last-bit differences while v is still small)
TOL = 1e-4


def _vit(seed: int, drop_path: float = 0.0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                             drop_path_rate=drop_path)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 10, (96,), generator=g))


def _loader(ds, seed: int):
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed))


def _max_delta(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("extra", [{}, dict(clip_grad=0.05, mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.9)],
                         ids=["plain", "clip-mixup-ema"])
def test_members_end_where_fit_takes_each_alone(data, one_thread, extra):
    cfg = TrainConfig(epochs=2, lr=3e-3, warmup_epochs=0.5, progress=False, accelerator="cpu", **extra)
    val = torch.utils.data.DataLoader(data, batch_size=32)
    models = [_vit(s) for s in SEEDS]
    res = fit_ensemble(models, [_loader(data, s) for s in SEEDS], val, cfg, seeds=SEEDS)
    assert len(res) == 3 and all(r.model is m for r, m in zip(res, models))
    for k, s in enumerate(SEEDS):
        alone = _vit(s)
        c = copy.copy(cfg)
        c.seed = s
        ref = fit(alone, _loader(data, s), val, c)
        assert _max_delta(alone, models[k]) < TOL
        assert _max_delta(_vit(s), models[k]) > 100 * TOL  # it did train
        assert res[k].history["train_loss"].tolist() == pytest.approx(ref.history["train_loss"].tolist(), abs=1e-5)
        for col in ("epoch", "train_loss", "lr", "steps", "val_top1", "val_top5", "val_loss"):
            assert col in res[k].history.columns
        assert res[k].history["lr"].tolist() == pytest.approx(ref.history["lr"].tolist())
        assert res[k].final["val_top1"] == pytest.approx(ref.final["val_top1"], abs=100 / 96 + 1e-9)
        if extra.get("ema_decay"):
            assert _max_delta(ref.ema, res[k].ema) < TOL
            assert "ema_top1" in res[k].history.columns


def test_clipping_is_per_member_not_over_the_stack():
    g = [torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([[0.0], [0.0]])]  # member norms 5 and 0.5
    assert member_grad_norms(g).tolist() == pytest.approx([5.0, 0.5])
    per = [t.clone() for t in g]
    _clip_per_member(per, 1.0)
    stack = [torch.nn.Parameter(torch.zeros_like(t)) for t in g]
    for p, t in zip(stack, g):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(stack, 1.0)  # what clipping the stack as one model would do
    glob = [p.grad for p in stack]
    assert per[0][0].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)  # member 0 scaled to norm 1
    assert per[0][1].tolist() == pytest.approx([0.3, 0.4])  # member 1 under the bound: untouched
    assert glob[0][1].tolist() != pytest.approx([0.3, 0.4])  # the stacked norm would have shrunk it


def test_drop_path_draws_differently_per_member(data, one_thread):
    cfg = TrainConfig(epochs=1, lr=3e-3, warmup_epochs=0.0, progress=False, max_steps_per_epoch=2)
    models = [_vit(0, drop_path=0.5), _vit(0, drop_path=0.5)]  # same init, same data order
    fit_ensemble(models, [_loader(data, 1), _loader(data, 1)], None, cfg, seeds=[0, 1])
    assert _max_delta(models[0], models[1]) > 1e-4


def test_divergence_names_the_member_seed(data, one_thread):
    models = [_vit(0), _vit(1)]
    with torch.no_grad():
        models[1].head.weight.fill_(float("nan"))
    cfg = TrainConfig(epochs=1, progress=False, max_steps_per_epoch=2)
    with pytest.raises(TrainingDivergedError, match=r"member 1 \(seed 42\)"):
        fit_ensemble(models, [_loader(data, 0), _loader(data, 1)], None, cfg, seeds=[41, 42])


class _Hook:
    def on_batch(self, batch):
        return batch


@pytest.mark.parametrize("kw, match", [
    (dict(hooks=[_Hook()]), "hooks"),
    (dict(cfg=TrainConfig(opt="lamb", progress=False)), "elementwise"),
    (dict(cfg=TrainConfig(precision="bf16-mixed", progress=False)), "precision"),
    (dict(cfg=TrainConfig(compile=True, progress=False)), "compile"),
])
def test_refuses_what_it_cannot_batch(data, kw, match):
    kw.setdefault("cfg", TrainConfig(progress=False))
    with pytest.raises(ValueError, match=match):
        fit_ensemble([_vit(0), _vit(1)], [_loader(data, 0), _loader(data, 1)], None, **kw)


def test_refuses_mismatched_members(data):
    other = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="same architecture"):
        fit_ensemble([_vit(0), other], [_loader(data, 0), _loader(data, 1)], None, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="train loaders"):
        fit_ensemble([_vit(0), _vit(1)], [_loader(data, 0)], None, TrainConfig(progress=False))


def test_seeds_per_hour_table(idx_dir, one_thread):
    """The benchmark's table in one process (no spawned workers: cheap): the ways, their settings and ratios."""
    from tokenbook.bench import seeds_per_hour

    df = seeds_per_hour(model_names=("vit_fm_tiny_p4_28",), img_sizes=(28,), ensemble_sizes=(2,), processes=1,
                        batch_size=16, steps=1, repeats=3, train_subset=64, data_dir=str(idx_dir))
    assert list(df.columns) == ["model", "img_size", "way", "K", "threads", "processes", "seeds_per_hour",
                                "ratio_vs_sequential", "q1", "q3", "repeats"]
    assert df["way"].tolist() == ["sequential", "ensemble"] and df["K"].tolist() == [1, 2]
    seq = df.iloc[0]
    assert seq["ratio_vs_sequential"] == seq["q1"] == seq["q3"] == 1.0
    assert (df["seeds_per_hour"] > 0).all() and (df["q1"] <= df["ratio_vs_sequential"]).all()
    with pytest.raises(ValueError, match="repeats"):
        seeds_per_hour(repeats=2)
    with pytest.raises(ValueError, match="image sizes"):
        seeds_per_hour(model_names=("a", "b"), img_sizes=(28,))
