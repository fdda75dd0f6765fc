"""timm conventions for one small model of each family (issue 13): forward / backward, the pretrained cfg,
forward_features + forward_head, forward_intermediates, features_only, reset_classifier, gradient checkpointing.

Our own checks (not timm's test file). A family is one line of ``FAMILIES``: (registry name, kwargs, input shape);
models are tiny (2 blocks, 28-32 px inputs) so the whole file runs in seconds on a CPU.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models._input import get_model_input_config

import tokenbook.models  # noqa: F401  (registers the families)
import tokenbook.models.t2t_vit as t2t
from tokenbook.experiments.t2t_vit import param_counts

#: family -> (registry name, kwargs, input shape (B, C, H, W)); add a family with one line
FAMILIES: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "vit_fm": ("vit_fm_tiny_p4_28", dict(depth=2), (2, 3, 28, 28)),
    "vit_fm_p7": ("vit_fm_tiny_p7_28", dict(depth=2), (2, 3, 28, 28)),  # the cpu scale: 16 tokens
    "t2t_vit": ("t2t_vit_tiny_fmnist", dict(depth=2, performer_dropout=0.0), (2, 1, 28, 28)),
    "toe_deit": ("toe_deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), (2, 3, 32, 32)),
    "seit": ("deit_fm_micro_token_32", dict(depth=2), (2, 32, 12, 12)),
    # two heads (timm's distilled-DeiT convention): eval gives the head named by eval_head, training both
    "vittm": ("vittm_cpu_m4p4_28", dict(depth=2, eval_head="process"), (2, 3, 28, 28)),
}
CFG_KEYS = ("url", "num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv",
            "classifier", "architecture", "license")
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def build(family: str, **extra) -> nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **{**kwargs, **extra})


def example(family: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(FAMILIES[family][2])


def heads(out) -> tuple[torch.Tensor, ...]:
    """The outputs of a model as a tuple (one tensor, or one per head of a multi-head model in training)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def classifiers(m: nn.Module) -> tuple[nn.Module, ...]:
    c = m.get_classifier()
    return tuple(c) if isinstance(c, (tuple, list)) else (c,)


def grid(model: nn.Module, shape: tuple[int, ...], reduction: int) -> tuple[int, int]:
    return shape[2] // reduction, shape[3] // reduction


family = pytest.mark.parametrize("family", list(FAMILIES))


@family
def test_forward_shape_and_finite(family):
    m, x = build(family).eval(), example(family)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (x.shape[0], m.num_classes) and torch.isfinite(out).all()


@family
def test_backward_reaches_every_parameter(family):
    """Every parameter is trainable and gets a gradient (fixed tables must be buffers, not frozen parameters)."""
    m, x = build(family).train(), example(family)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert not frozen, f"frozen parameters (make them buffers): {frozen}"
    sum(o.mean() for o in heads(m(x))).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@family
def test_pretrained_cfg_is_complete_and_names_real_modules(family):
    name, _, shape = FAMILIES[family]
    m = build(family)
    cfg = m.pretrained_cfg
    missing = [k for k in CFG_KEYS if k not in cfg]
    assert not missing, f"pretrained_cfg lacks {missing}"
    assert cfg["architecture"] == name and isinstance(cfg["url"], str) and cfg["license"]
    assert cfg["num_classes"] == m.num_classes
    c = cfg["input_size"][0]
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == c
    assert get_model_input_config(m)["input_size"] == tuple(shape[1:])
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bilinear", "bicubic", "nearest")
    feats = m.eval().forward_features(example(family))
    if cfg["pool_size"] is None:  # timm's ViT convention: the features are a token sequence, no spatial map
        assert feats.ndim == 3
    else:
        assert tuple(feats.shape[-2:]) == tuple(cfg["pool_size"])
    # first_conv: the first conv / linear that sees the pixels; its weights exist and take the input channels
    sd = m.state_dict()
    firsts = cfg["first_conv"] if isinstance(cfg["first_conv"], (tuple, list)) else (cfg["first_conv"],)
    for name_ in firsts:  # several stems (ViTTM's two patch embeddings) each see the pixels
        first = m.get_submodule(name_)
        assert name_ + ".weight" in sd
        assert isinstance(first, (nn.Conv2d, nn.Linear)), type(first)
        if isinstance(first, nn.Conv2d):
            assert first.in_channels == shape[1]
        else:  # a linear on unfolded patches: in_features = channels x kernel area
            assert first.in_features % shape[1] == 0
    names = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    assert tuple(m.get_submodule(c) for c in names) == classifiers(m)
    for c in names:
        head = m.get_submodule(c)
        assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (m.num_features, m.num_classes)
        assert c + ".weight" in sd


@family
def test_forward_features_then_head_equals_forward(family):
    m, x = build(family).eval(), example(family)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.ndim == 3 and feats.shape[-1] == m.num_features
        assert torch.allclose(m.forward_head(feats), m(x), atol=ATOL)
        assert m.forward_head(feats, pre_logits=True).shape == (x.shape[0], m.num_features)


@family
def test_forward_intermediates(family):
    m, x = build(family).eval(), example(family)
    n, npt = len(m.blocks), m.num_prefix_tokens
    info = m.feature_info
    assert len(info) == n and [f["module"] for f in info] == [f"blocks.{i}" for i in range(n)]
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.allclose(final, m.forward_features(x), atol=ATOL)
        assert len(inter) == n
        for i, y in enumerate(inter):
            h, w = grid(m, x.shape, info[i]["reduction"])
            assert y.shape == (x.shape[0], info[i]["num_chs"], h, w)
        only = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert isinstance(only, list) and len(only) == 1
        assert torch.allclose(only[0], inter[-1].flatten(2).transpose(1, 2), atol=ATOL)
        # the last block, normed, is forward_features without the prefix tokens
        normed = m.forward_intermediates(x, indices=[n - 1], norm=True, output_fmt="NLC", intermediates_only=True)
        assert torch.allclose(normed[0], final[:, npt:], atol=ATOL)
        with_prefix = m.forward_intermediates(x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        assert with_prefix[0][1].shape == (x.shape[0], npt, info[0]["num_chs"])


@family
def test_features_only_matches_feature_info_and_model(family):
    name, kwargs, _ = FAMILIES[family]
    m, x = build(family).eval(), example(family)
    torch.manual_seed(0)
    f = timm.create_model(name, features_only=True, out_indices=(0, 1), **kwargs).eval()
    f.model.load_state_dict(m.state_dict(), strict=False)  # the wrapper pruned the head
    with torch.no_grad():
        outs = f(x)
        ref = m.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert len(outs) == len(f.feature_info.channels()) == 2
    for o, r, c, red in zip(outs, ref, f.feature_info.channels(), f.feature_info.reduction()):
        assert o.shape == (x.shape[0], c, *grid(m, x.shape, red))
        assert torch.allclose(o, r, atol=ATOL)


@family
def test_reset_classifier(family):
    m, x = build(family).eval(), example(family)
    m.reset_classifier(0)
    assert all(isinstance(c, nn.Identity) for c in classifiers(m))
    with torch.no_grad():
        assert m(x).shape == (x.shape[0], m.num_features)
    m.reset_classifier(7)
    assert all(c.out_features == 7 for c in classifiers(m)) and m.num_classes == 7
    with torch.no_grad():
        assert m(x).shape == (x.shape[0], 7)


@family
def test_gradient_checkpointing_same_output_and_gradients(family):
    a, x = build(family).train(), example(family)
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    outs, grads = [], []
    for m in (a, b):
        out = torch.cat(heads(m(x)), dim=1)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert torch.allclose(outs[0], outs[1], atol=ATOL)
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=ATOL), n


# ------------------------------------------------------------------------------------------------------------
# family specifics
# ------------------------------------------------------------------------------------------------------------
def test_toe_selection_only_in_training_and_nchw_guard():
    m, x = build("toe_deit"), example("toe_deit")
    _, kwargs, _ = FAMILIES["toe_deit"]
    plain = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    ts = m.token_select
    ts.expansion_stage = 1  # a reducing stage (keep rate 0.5)
    with torch.no_grad():
        assert m.eval().forward_features(x).shape == plain.forward_features(x).shape == (2, 17, 192)
        m.train()
        feats = m.forward_features(x)
        assert feats.shape[1] < 17 and m.forward_head(feats).shape == (2, 1000)
        nlc = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert nlc[1].shape[1] == feats.shape[1] - 1
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            m.forward_intermediates(x)


def test_t2t_first_conv_of_every_registered_variant():
    for name in t2t.OFFICIAL_CONFIGS:
        m = timm.create_model(name, device="meta")
        fc = m.pretrained_cfg["first_conv"]
        assert fc + ".weight" in m.state_dict(), name
        assert isinstance(m.get_submodule(fc), (nn.Conv2d, nn.Linear)), name
        assert fc == t2t.FIRST_CONV[m.tokens_to_token.tokens_type], name


def test_t2t_fixed_tables_are_buffers_in_the_state_dict_and_counted():
    m = build("t2t_vit")
    tables = {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert tables <= set(dict(m.named_buffers())) and tables <= set(m.state_dict())
    assert not tables & set(dict(m.named_parameters()))
    counts = param_counts(m)
    extra = sum(dict(m.named_buffers())[k].numel() for k in tables)
    assert counts["total"] == sum(p.numel() for p in m.parameters()) + extra
    assert counts["trainable"] == sum(p.numel() for p in m.parameters())


def test_t2t_dense_feature_info_follows_the_growing_width():
    kw = dict(img_size=32, block_config=(1, 2), embed_dim=32, num_heads=2, growth_rate=16, token_dim=8,
              soft_split=t2t.FMNIST_SOFT_SPLIT, in_chans=1, num_classes=3)
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_dense", **kw).eval()
    # dense block 32 -> 48, transition 48 -> 24, dense blocks 24 -> 40 -> 56
    assert [f["num_chs"] for f in m.feature_info] == [48, 24, 40, 56] and m.num_features == 56
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        inter = m.forward_intermediates(x, intermediates_only=True)
        assert [tuple(y.shape) for y in inter] == [(1, c, 8, 8) for c in (48, 24, 40, 56)]
        with pytest.raises(ValueError, match="norm=True"):
            m.forward_intermediates(x, indices=[0], norm=True)
        f = timm.create_model("t2t_vit_dense", features_only=True, out_indices=(0, 1), **kw).eval()
        assert f.feature_info.channels() == [48, 24] and [o.shape[1] for o in f(x)] == [48, 24]
    with pytest.raises(ValueError, match="prune_norm=True"):
        copy.deepcopy(m).prune_intermediate_layers([1], prune_norm=False)
