"""Tests of tokenbook.models.t2t_vit against the T2T-ViT reference sheet (../shared/papers/t2t_vit.md).

Big models are built on the meta device for parameter / key / MAC counts; checkpoint tests use state dicts built
from the official key names and shapes listed in the sheet (section 3.2), not from our own modules.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import tokenbook.models.t2t_vit as t2t
from tokenbook.experiments import t2t_vit as t2t_exp
from tokenbook.bench import count_macs
from tokenbook.references import load

torch.set_num_threads(2)

# --------------------------------------------------------------------------------------------------------------
# Numbers of the reference sheet, section 3 (official code, measured)
# --------------------------------------------------------------------------------------------------------------
OFFICIAL = {  # name: (params all, trainable, state_dict keys, T2T module params, GMACs at 224)
    "t2t_vit_7": (4_310_222, 4_255_694, 111, 317_670, 1.147),
    "t2t_vit_10": (5_889_230, 5_834_702, 144, 317_670, 1.516),
    "t2t_vit_12": (6_941_902, 6_887_374, 166, 317_670, 1.763),
    "t2t_vit_14": (21_545_550, 21_465_806, 188, 391_526, 4.783),
    "t2t_vit_19": (39_177_422, 39_085_070, 243, 428_454, 8.480),
    "t2t_vit_24": (64_105_934, 64_000_974, 298, 465_382, 13.662),
    "t2t_vit_t_14": (21_541_070, 21_465_422, 184, 387_046, 6.089),
    "t2t_vit_t_19": (39_172_942, 39_084_686, 239, 423_974, 9.785),
    "t2t_vit_t_24": (64_101_454, 64_000_590, 294, 460_902, 14.967),
    "t2t_vit_14_resnext": (21_545_550, 21_465_806, 188, 391_526, 4.783),
    "t2t_vit_14_wide": (25_156_302, 25_000_910, 78, 613_094, 5.229),
    "t2t_vit_14_se": (21_803_598, 21_723_854, 216, 391_526, 4.784),
    "t2t_vit_dense": (23_647_062, 23_617_750, 287, 243_814, 5.276),
    "t2t_vit_16_ghost": (16_253_262, 16_173_518, 322, 391_526, 3.802),
}
OFFICIAL_384 = {"t2t_vit_14": (21_691_470, 16.370), "t2t_vit_t_14": (21_686_990, 27.827)}


def meta(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, device="meta", **kw)


def n_params(m: torch.nn.Module, trainable: bool = False) -> int:
    """Parameters as the paper / official code count them: the frozen tables (buffers here) are in the total."""
    return t2t_exp.param_counts(m)["trainable" if trainable else "total"]


def official_t2t_keys(tokens_type: str, d: int) -> dict[str, tuple[int, ...]]:
    """T2T-module keys and shapes exactly as listed in the sheet (section 3.2)."""
    keys: dict[str, tuple[int, ...]] = {}
    for i, din in ((1, 147), (2, 576)):
        p = f"tokens_to_token.attention{i}."
        if tokens_type == "performer":
            keys.update({p + "w": (32, 64), p + "kqv.weight": (192, din), p + "kqv.bias": (192,),
                         p + "proj.weight": (64, 64), p + "proj.bias": (64,), p + "norm1.weight": (din,),
                         p + "norm1.bias": (din,), p + "norm2.weight": (64,), p + "norm2.bias": (64,),
                         p + "mlp.0.weight": (64, 64), p + "mlp.0.bias": (64,), p + "mlp.2.weight": (64, 64),
                         p + "mlp.2.bias": (64,)})
        else:
            keys.update({p + "norm1.weight": (din,), p + "norm1.bias": (din,), p + "attn.qkv.weight": (192, din),
                         p + "attn.proj.weight": (64, 64), p + "attn.proj.bias": (64,), p + "norm2.weight": (64,),
                         p + "norm2.bias": (64,), p + "mlp.fc1.weight": (64, 64), p + "mlp.fc1.bias": (64,),
                         p + "mlp.fc2.weight": (64, 64), p + "mlp.fc2.bias": (64,)})
    keys["tokens_to_token.project.weight"] = (d, 576)
    keys["tokens_to_token.project.bias"] = (d,)
    return keys


def official_keys(tokens_type: str, d: int, depth: int, mlp: int, n_tokens: int = 197) -> dict[str, tuple[int, ...]]:
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, n_tokens, d)}
    keys.update(official_t2t_keys(tokens_type, d))
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "norm2.weight": (d,),
                     b + "norm2.bias": (d,), b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
                     b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (1000, d), "head.bias": (1000,)})
    return keys


def official_state_dict(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the official names/shapes; LayerNorm weights near 1 so outputs stay sane."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        v = torch.randn(shape, generator=g) * 0.02
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            v = v + 1.0
        if k.endswith(".w"):
            v = torch.nn.init.orthogonal_(torch.randn(shape, generator=g)) * math.sqrt(shape[0])
        sd[k] = v
    return sd


# --------------------------------------------------------------------------------------------------------------
# Token counts and shapes
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grids", [
    (224, [(56, 56), (28, 28), (14, 14)]),
    (384, [(96, 96), (48, 48), (24, 24)]),
    (200, [(50, 50), (25, 25), (13, 13)]),   # not a multiple of 16: official code assumes 12x12 and fails
    ((224, 160), [(56, 40), (28, 20), (14, 10)]),
])
def test_soft_split_grids_and_t2t_shapes(size, grids):
    assert t2t.soft_split_grids(size) == grids
    torch.manual_seed(0)
    m = t2t.T2TModule(img_size=size, tokens_type="performer", embed_dim=32).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        stages = m.forward_stages(x)
        tokens = m(x)
    (h0, w0), (h1, w1), (h2, w2) = grids
    assert stages["soft_split0"].shape == (1, 147, h0, w0)
    assert stages["attention1"].shape == (1, 64, h0, w0)
    assert stages["soft_split1"].shape == (1, 576, h1, w1)
    assert stages["attention2"].shape == (1, 64, h1, w1)
    assert stages["soft_split2"].shape == (1, 576, h2, w2)
    assert stages["project"].shape == (1, 32, h2, w2)
    assert list(stages) == ["soft_split0", "attention1", "soft_split1", "attention2", "soft_split2", "project"]
    assert tokens.shape == (1, h2 * w2, 32) and m.num_patches == h2 * w2
    assert torch.equal(tokens, stages["project"].flatten(2).transpose(1, 2))


def test_token_counts_with_class_token_at_224_384_200():
    for size, n in ((224, 197), (384, 577), (200, 170), (192, 145), (256, 257)):
        m = meta("t2t_vit_14", img_size=size)
        assert m.pos_embed.shape == (1, n, 384)
        assert m.forward_tokens(torch.empty(1, 3, size, size, device="meta")).shape == (1, n, 384)


def test_unfold_feature_order_is_channel_major():
    x = torch.randn(1, 3, 32, 32)
    tokens = torch.nn.Unfold(7, stride=4, padding=2)(x)  # what soft_split0 is
    m = t2t.T2TModule(img_size=32, tokens_type="performer", embed_dim=8)
    assert torch.equal(m.forward_stages(x)["soft_split0"].flatten(2), tokens)
    xp = F.pad(x, (2, 2, 2, 2))
    row, col = 3, 5  # token (3, 5) of the 8x8 grid
    patch = xp[0, :, 4 * row:4 * row + 7, 4 * col:4 * col + 7]
    for c, i, j in ((0, 0, 0), (1, 2, 5), (2, 6, 6), (0, 3, 1)):
        assert tokens[0, c * 49 + i * 7 + j, row * 8 + col] == patch[c, i, j]


def test_full_model_forward_at_200_px_and_non_square():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", img_size=(28, 20), in_chans=3, num_classes=7)
    assert m(torch.randn(2, 3, 28, 20)).shape == (2, 7)
    m = meta("t2t_vit_7", img_size=200)
    assert m(torch.empty(1, 3, 200, 200, device="meta")).shape == (1, 1000)


def test_wrong_input_size_names_the_fix_and_dynamic_size_adapts_table():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", depth=2).eval()
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="in_chans=3"):
        m(torch.randn(1, 3, 28, 28))
    for mode in ("interpolate", "regenerate"):
        d = timm.create_model("t2t_vit_tiny_fmnist", dynamic_img_size=True, pos_embed_mode=mode, depth=2).eval()
        d.load_state_dict(m.state_dict())
        assert torch.equal(d(torch.ones(1, 1, 28, 28)), m(torch.ones(1, 1, 28, 28)))
        table = d._pos_embed_for((8, 8), torch.empty(0))
        assert table.shape == (1, 65, 128)
        if mode == "regenerate":  # same table as a model built at 32 px
            built32 = timm.create_model("t2t_vit_tiny_fmnist", img_size=32, depth=1)
            assert torch.equal(table, built32.pos_embed.data)
        else:  # bicubic on the 7x7 grid, class entry kept
            grid = d.pos_embed[:, 1:].reshape(1, 7, 7, 128).permute(0, 3, 1, 2)
            ref = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
            assert torch.allclose(table[:, 1:], ref.reshape(1, 64, 128), atol=1e-6)
            assert torch.equal(table[:, :1], d.pos_embed[:, :1])
        assert torch.isfinite(d(torch.randn(2, 1, 32, 32))).all()


# --------------------------------------------------------------------------------------------------------------
# Parameter counts, keys, MACs
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_exact_parameter_counts_keys_and_macs(name):
    total, trainable, n_keys, t2t_params, gmacs = OFFICIAL[name]
    m = meta(name)
    assert n_params(m) == total
    assert n_params(m, trainable=True) == trainable
    assert len(m.state_dict()) == n_keys
    assert n_params(m.tokens_to_token) == t2t_params
    macs = count_macs(m, input_size=(3, 224, 224))["gmacs"]
    assert abs(macs - gmacs) <= 0.01 * gmacs, (name, macs, gmacs)


@pytest.mark.parametrize("name", list(OFFICIAL_384))
def test_384_parameter_counts_and_macs(name):
    total, gmacs = OFFICIAL_384[name]
    m = meta(name + ".in1k_384") if name == "t2t_vit_14" else meta(name, img_size=384)  # the tag builds at 384 px
    assert m.pos_embed.shape[1] == 577
    assert n_params(m) == total
    macs = count_macs(m, input_size=(3, 384, 384))["gmacs"]
    assert abs(macs - gmacs) <= 0.01 * gmacs


def test_closed_form_counts_of_the_sheet():
    # block = (4+2r) D^2 + (r+6) D; T2T performer = 169,958 + 577 D; transformer = 165,478 + 577 D
    for d, r, depth, name in ((384, 3, 14, "t2t_vit_14"), (256, 2, 7, "t2t_vit_7"), (448, 3, 19, "t2t_vit_t_19")):
        m = meta(name)
        assert n_params(m.blocks[0]) == (4 + 2 * r) * d * d + (r + 6) * d
        t2t_expected = (169_958 if "_t_" not in name else 165_478) + 577 * d
        assert n_params(m.tokens_to_token) == t2t_expected
        assert n_params(m) == depth * n_params(m.blocks[0]) + t2t_expected + d + 197 * d + 2 * d + 1000 * d + 1000


def test_table7_variants_and_paper_numbers():
    c14 = meta("t2t_vit_c_14")
    t = c14.tokens_to_token
    assert [(mod.kernel_size[0], mod.stride[0]) for mod in (t.soft_split0, t.soft_split1, t.project)] == \
        [(7, 4), (3, 2), (3, 2)]
    # convs 3->64 (k7), 64->64 (k3), 64->384 (k3) with biases
    assert n_params(t) == 3 * 64 * 49 + 64 + 64 * 64 * 9 + 64 + 64 * 384 * 9 + 384 == 267_968
    assert n_params(c14) == 21_545_550 - 391_526 + 267_968
    assert abs(count_macs(c14)["gmacs"] - 4.6) <= 0.01 * 4.6  # paper Table 7: 4.6G
    wo = meta("t2t_vit_14_wo_t2t")
    assert n_params(wo.tokens_to_token) == 3 * 256 * 384 + 384
    assert wo.pos_embed.shape == (1, 197, 384)
    wide = meta("t2t_vit_14_wide")
    assert (wide.embed_dim, len(wide.blocks)) == (768, 4)
    assert meta("t2t_vit_14_resnext").blocks[0].attn.head_dim == 12


def test_dense_widths_drop_path_quirk_and_classifier():
    m = timm.create_model("t2t_vit_dense", device="meta", drop_path_rate=0.1)
    widths = [blk.norm1.normalized_shape[0] for blk in m.blocks if isinstance(blk, t2t.DenseBlock)]
    assert widths == [128, 192, 256, 160, 224, 288, 352, 416, 480, 272, 336, 400, 464, 528, 592, 328, 392, 456, 520]
    assert [b.linear.out_features for b in m.blocks if isinstance(b, t2t.Transition)] == [160, 272, 328]
    assert m.num_features == 584 and m.head.in_features == 584
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0
             for blk in m.blocks if isinstance(blk, t2t.DenseBlock)]
    stage_rate = [0.1 * i / 11 for i in range(4)]  # linspace(0, 0.1, 12)[stage]
    expected = [stage_rate[s] for s, n in enumerate((3, 6, 6, 4)) for _ in range(n)]
    assert rates == pytest.approx(expected)
    m.reset_classifier(10)
    assert m.head.in_features == 584 and m.head.out_features == 10


def test_frozen_tables_and_weight_decay_exclusions():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist")
    # the fixed tables are persistent buffers (official state-dict keys), not frozen parameters
    assert all(p.requires_grad for p in m.parameters())
    tables = {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert set(t2t_exp.frozen_tables(m)) == tables
    assert tables <= set(dict(m.named_buffers())) and tables <= set(m.state_dict())
    assert m.no_weight_decay() == {"cls_token"}
    pe = m.pos_embed[0]
    assert torch.equal(pe[0, 0::2], torch.zeros(64)) and torch.equal(pe[0, 1::2], torch.ones(64))
    # the performer's fixed features: orthogonal rows of norm sqrt(m) (m = 16 for token_dim 32)
    w = m.tokens_to_token.attention1.w
    assert w.shape == (16, 32)
    assert torch.allclose(w @ w.t(), 16 * torch.eye(16), atol=1e-4)


def test_sinusoid_table_matches_formula():
    n, d = 197, 384
    pos = np.arange(n)[:, None]
    j = np.arange(d)[None, :]
    angle = pos / np.power(10000, 2 * (j // 2) / d)
    ref = np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)
    assert torch.allclose(t2t.sinusoid_table(n, d)[0], torch.from_numpy(ref), atol=1e-6)


def test_backbone_uses_head_dim_scale_and_official_layers():
    m = meta("t2t_vit_14", pretrained=False)
    attn = m.blocks[0].attn
    assert attn.scale == pytest.approx(64 ** -0.5)  # not the pretrained=True quirk 384^-0.5
    assert attn.qkv.bias is None
    assert m.blocks[0].norm1.eps == 1e-5 and m.norm.eps == 1e-5
    tt = meta("t2t_vit_t_14").tokens_to_token
    assert tt.attention1.attn.scale == pytest.approx(147 ** -0.5)
    assert tt.attention2.attn.scale == pytest.approx(576 ** -0.5)
    assert tt.attention1.attn.qkv.bias is None
    p = meta("t2t_vit_14").tokens_to_token.attention1
    assert (p.m, p.dp.p, p.mlp[3].p) == (32, 0.1, 0.1)


# --------------------------------------------------------------------------------------------------------------
# Math of the T2T layers against independent re-statements of the sheet's formulas
# --------------------------------------------------------------------------------------------------------------
def _ln(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def test_performer_layer_matches_formula():
    torch.manual_seed(0)
    layer = t2t.TokenPerformer(dim=27, in_dim=16, kernel_ratio=0.5).eval()
    x = torch.randn(2, 10, 27)
    with torch.no_grad():
        out = layer(x)
        h = _ln(x, layer.norm1) @ layer.kqv.weight.t() + layer.kqv.bias
        k, q, v = h[..., :16], h[..., 16:32], h[..., 32:]  # order k | q | v
        w, m = layer.w, 8

        def phi(z):
            return torch.exp(z @ w.t() - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(m)
        a = phi(q) @ phi(k).transpose(1, 2)  # quadratic form of the linear attention
        y = (a @ v) / (a.sum(-1, keepdim=True) + 1e-8)
        y = v + y @ layer.proj.weight.t() + layer.proj.bias
        z = _ln(y, layer.norm2)
        ref = y + layer.mlp[2](F.gelu(layer.mlp[0](z)))
        assert torch.allclose(out, ref, atol=1e-5)
        # the attention matrix helper is that normalized kernel matrix
        assert torch.allclose(layer.attention_matrix(x), a / a.sum(-1, keepdim=True), atol=1e-6)
        # official dtype path is the same math in float32
        layer.fp32 = False
        assert torch.allclose(layer(x), out, atol=1e-5)


def test_transformer_t2t_layer_matches_formula():
    torch.manual_seed(0)
    layer = t2t.TokenTransformer(dim=27, in_dim=16).eval()
    x = torch.randn(2, 10, 27)
    with torch.no_grad():
        z = _ln(x, layer.norm1) @ layer.attn.qkv.weight.t()
        q, k, v = z[..., :16], z[..., 16:32], z[..., 32:]  # order q | k | v
        a = torch.softmax(q @ k.transpose(1, 2) * 27 ** -0.5, -1)  # scale from the input width
        y = v + (a @ v) @ layer.attn.proj.weight.t() + layer.attn.proj.bias
        ref = y + layer.mlp.fc2(F.gelu(layer.mlp.fc1(_ln(y, layer.norm2))))
        for fused in (True, False):
            layer.attn.fused_attn = fused
            assert torch.allclose(layer(x), ref, atol=1e-5)
        assert torch.allclose(layer.attention_matrix(x), a, atol=1e-6)


def test_performer_dropout_is_hard_coded_and_active_in_training():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", drop_rate=0.0, drop_path_rate=0.0, depth=1)
    x = torch.randn(2, 1, 28, 28)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    m = timm.create_model("t2t_vit_tiny_fmnist", performer_dropout=0.0, depth=1).train()
    assert torch.equal(m(x), m(x))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints in the official format
# --------------------------------------------------------------------------------------------------------------
def test_model_keys_equal_the_official_listing():
    for name, tt, d, depth, mlp in (("t2t_vit_14", "performer", 384, 14, 1152), ("t2t_vit_7", "performer", 256, 7, 512),
                                    ("t2t_vit_t_14", "transformer", 384, 14, 1152)):
        own = {k: tuple(v.shape) for k, v in meta(name).state_dict().items()}
        assert own == official_keys(tt, d, depth, mlp)


def _save(tmp_path, obj, name="ckpt.pth.tar"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_released_checkpoint_loads_strictly_through_timm(tmp_path):
    sd = official_state_dict(official_keys("performer", 256, 7, 512))
    path = _save(tmp_path, {"state_dict_ema": sd})  # released files: state_dict_ema, no prefix
    m = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    # a raw training checkpoint (state_dict + state_dict_ema with DataParallel prefix) picks the EMA weights
    raw = {"epoch": 3, "state_dict": {("module." + k): torch.zeros_like(v) for k, v in sd.items()},
           "state_dict_ema": {("module." + k): v for k, v in sd.items()}}
    m2 = t2t.load_official_checkpoint(timm.create_model("t2t_vit_7").eval(), raw)
    with torch.no_grad():
        assert torch.equal(m2(x), out)


def test_transformer_checkpoint_and_new_head(tmp_path):
    # official names and shapes of t2t_vit_t_14, truncated to 2 blocks (depth=2) to keep the test cheap
    sd = official_state_dict(official_keys("transformer", 384, 2, 1152), seed=1)
    path = _save(tmp_path, {"state_dict_ema": sd})
    m = timm.create_model("t2t_vit_t_14", pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=10,
                          depth=2)
    own = m.state_dict()
    assert m.head.out_features == 10
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("head."))


def test_384_checkpoint_and_224_weights_at_other_sizes(tmp_path):
    # official names and shapes of t2t_vit_14 (2 blocks instead of 14 to keep the test cheap)
    keys = official_keys("performer", 384, 2, 1152, n_tokens=577)
    sd384 = official_state_dict(keys, seed=2)
    path = _save(tmp_path, {"state_dict_ema": sd384}, "384.pth")
    m = timm.create_model("t2t_vit_14.in1k_384", pretrained=True, pretrained_cfg_overlay=dict(file=path), depth=2)
    assert m.pos_embed.shape == (1, 577, 384) and torch.equal(m.pos_embed, sd384["pos_embed"])
    assert m.pretrained_cfg["input_size"] == (3, 384, 384)

    sd224 = official_state_dict(official_keys("performer", 384, 2, 1152), seed=3)
    path = _save(tmp_path, {"state_dict_ema": sd224}, "224.pth")
    m = timm.create_model("t2t_vit_14", pretrained=True, pretrained_cfg_overlay=dict(file=path), img_size=384, depth=2)
    grid = sd224["pos_embed"][:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 576, 384)
    assert torch.allclose(m.pos_embed[:, 1:], ref, atol=1e-6)
    assert torch.equal(m.pos_embed[:, :1], sd224["pos_embed"][:, :1])
    assert torch.equal(m.blocks[1].mlp.fc1.weight, sd224["blocks.1.mlp.fc1.weight"])
    with torch.no_grad():
        assert torch.isfinite(m.eval()(torch.randn(1, 3, 384, 384))).all()

    m = timm.create_model("t2t_vit_14", pretrained=True, pretrained_cfg_overlay=dict(file=path), img_size=200,
                          pos_embed_mode="regenerate", depth=2)
    assert torch.equal(m.pos_embed, t2t.sinusoid_table(170, 384))


def test_mismatched_checkpoints_list_the_keys(tmp_path):
    sd14 = official_state_dict(official_keys("performer", 384, 14, 1152))
    with pytest.raises(ValueError, match=r"missing keys \['tokens_to_token.attention1.attn.qkv.weight"):
        t2t.checkpoint_filter_fn(sd14, timm.create_model("t2t_vit_t_14", device="meta"))
    sd = official_state_dict(official_keys("performer", 256, 7, 512))
    bad = dict(sd)
    del bad["blocks.6.mlp.fc2.bias"]
    bad["blocks.7.norm1.weight"] = torch.ones(256)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.6.mlp.fc2.bias'\]; unexpected keys "
                                         r"\['blocks.7.norm1.weight'\]"):
        t2t.checkpoint_filter_fn(bad, timm.create_model("t2t_vit_7", device="meta"))
    path = _save(tmp_path, {"state_dict_ema": sd})
    with pytest.raises(ValueError, match=r"shape mismatches \['cls_token: checkpoint \(1, 1, 256\) vs model "
                                         r"\(1, 1, 384\)'"):
        timm.create_model("t2t_vit_14", pretrained=True, pretrained_cfg_overlay=dict(file=path), depth=7)


# --------------------------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------------------------
def test_performer_is_finite_under_bf16_autocast():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", in_chans=3, depth=2).train()
    x = torch.randn(4, 3, 28, 28) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    loss = F.cross_entropy(out.float(), torch.arange(4))
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # close to the fp32 result in eval mode
    m.eval()
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x).float()
    assert torch.allclose(low, ref, atol=0.1 * ref.abs().max().item())


def test_performer_fp32_fix_vs_official_dtype_behaviour_in_fp16():
    torch.manual_seed(0)
    layer = t2t.TokenPerformer(dim=27, in_dim=16).eval()
    with torch.no_grad():
        layer.kqv.weight.mul_(100)  # large q/k: exponents beyond fp16's range (exp(11.1) > 65504)
    x = torch.randn(2, 50, 27)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            layer.kqv(x)
    except RuntimeError:
        pytest.skip("CPU fp16 autocast not available in this torch build")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        safe = layer(x)
        layer.fp32 = False
        official = layer(x)
    assert torch.isfinite(safe).all()
    assert not torch.isfinite(official).all()


# --------------------------------------------------------------------------------------------------------------
# Notebook helpers
# --------------------------------------------------------------------------------------------------------------
def test_receptive_fields():
    rf = t2t.soft_split_receptive_fields()
    assert [(r["rf"], r["jump"], r["offset"]) for r in rf] == [(7, 4, -2), (15, 8, -6), (31, 16, -14)]
    assert t2t.token_receptive_field(0, 0, 224) == (slice(0, 17), slice(0, 17))
    assert t2t.token_receptive_field(5, 13, 224) == (slice(66, 97), slice(194, 224))
    # the geometry equals the gradient support of a token through the conv T2T (same kernels/strides/paddings)
    torch.manual_seed(0)
    m = t2t.T2TModule(img_size=64, tokens_type="convolution", embed_dim=4, token_dim=4, conv_act="none")
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    m(x)[0, 1 * 4 + 2].sum().backward()  # token (1, 2) of the 4x4 grid
    rows, cols = t2t.token_receptive_field(1, 2, 64)
    support = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[rows, cols] = True
    assert torch.equal(support, expected)


def test_feature_and_attention_helpers():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    for name in ("t2t_vit_tiny_fmnist", "t2t_vit_t_tiny_fmnist"):
        m = timm.create_model(name).train()
        feats = t2t_exp.t2t_token_features(m, x)
        assert m.training
        assert feats["soft_split0"].shape == (2, 25, 14, 14) and feats["attention1"].shape == (2, 32, 14, 14)
        assert feats["project"].shape == (2, 128, 7, 7)
        with torch.no_grad():
            m.eval()
            tokens = m.tokens_to_token(x)
        assert torch.allclose(feats["project"].flatten(2).transpose(1, 2), tokens, atol=1e-6)
        maps = t2t_exp.t2t_attention_maps(m, x)
        assert maps["attention1"].shape == (2, 196, 196) and maps["attention2"].shape == (2, 49, 49)
        assert torch.allclose(maps["attention2"].sum(-1), torch.ones(2, 49), atol=1e-4)
        bb = t2t_exp.backbone_attention_maps(m, x)
        assert len(bb) == 8 and bb[0].shape == (2, 4, 50, 50)
        assert torch.allclose(bb[-1].sum(-1), torch.ones(2, 4, 50), atol=1e-4)
    vit = timm.create_model("t2t_vit_tiny_fmnist_wo_t2t")
    assert t2t_exp.vit_patch_features(vit, x).shape == (2, 128, 7, 7)
    ghost = timm.create_model("t2t_vit_16_ghost", img_size=64, depth=2)
    assert [a.shape for a in t2t_exp.backbone_attention_maps(ghost, torch.randn(1, 3, 64, 64))] == [(1, 6, 17, 17)] * 2


@pytest.mark.parametrize("size", [28, 32])
def test_fmnist_ablations_build_and_run(size):
    variants = t2t_exp.fmnist_ablations(img_size=size)
    assert set(variants) == {"t2t_performer", "t2t_transformer", "t2t_convolution", "no_t2t", "deep_narrow",
                             "shallow_wide", "vit"}
    x = torch.randn(2, 1, size, size)
    models = {}
    for key, (name, kw) in variants.items():
        torch.manual_seed(0)
        models[key] = timm.create_model(name, **kw).eval()
        with torch.no_grad():
            assert models[key](x).shape == (2, 10)
    tokens = (size // 4) ** 2
    assert models["no_t2t"].pos_embed.shape[1] == models["t2t_performer"].pos_embed.shape[1] == tokens + 1
    dn, sw = models["deep_narrow"], models["shallow_wide"]
    assert (dn.embed_dim, len(dn.blocks), sw.embed_dim, len(sw.blocks)) == (128, 8, 256, 2)
    def matrices(blocks):  # the (4 + 2r) D^2 weight-matrix parameters are identical; biases/norms differ slightly
        return sum(p.numel() for p in blocks.parameters() if p.ndim == 2)
    assert matrices(dn.blocks) == matrices(sw.blocks) == 8 * 8 * 128 ** 2
    assert abs(n_params(dn) - n_params(sw)) <= 0.05 * n_params(dn)
    assert models["t2t_convolution"].tokens_to_token.tokens_type == "convolution"
    vit = models["vit"]  # the plain ViT arm: hard 4 px split, learned positions, params within 10 % of the T2T-ViT
    assert vit.patch_embed.num_patches == tokens and vit.pos_embed.requires_grad
    assert abs(n_params(vit) / n_params(models["t2t_performer"]) - 1) <= 0.10


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown tokens_type 'conv'"):
        t2t.T2TModule(tokens_type="conv")
    with pytest.raises(ValueError, match="kernel, stride, padding"):
        t2t.T2TModule(soft_split=((7, 4), (3, 2, 1)))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        t2t.soft_split_grids(4, ((7, 4, 1),))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        timm.create_model("t2t_vit_tiny_fmnist", num_heads=3)
    with pytest.raises(ValueError, match="unknown pos_embed_mode"):
        timm.create_model("t2t_vit_tiny_fmnist", pos_embed_mode="resize")
    with pytest.raises(ValueError, match="unknown block_type"):
        timm.create_model("t2t_vit_tiny_fmnist", block_type="dense")
    with pytest.raises(ValueError, match="mlp_ratio 3"):
        timm.create_model("t2t_vit_16_ghost", mlp_ratio=4.0, device="meta")
    with pytest.raises(ValueError, match="outside"):
        t2t.token_receptive_field(14, 0, 224)


def test_references_file_validates():
    refs = load("t2t_vit")
    by = {(r.model, r.metric): r for r in refs}
    assert by[("t2t_vit_14", "top1")].value == 81.5
    assert by[("t2t_vit_14", "params")].value == 21_545_550
    assert by[("t2t_vit_7", "params")].value == OFFICIAL["t2t_vit_7"][0]
    for name, (total, *_rest, gmacs) in OFFICIAL.items():
        assert by[(name, "params")].value == total and by[(name, "gmacs")].value == gmacs
    assert {r.kind for r in refs} <= {"paper", "official_code", "official_code_measured", "third_party"}


def test_timm_plumbing_checkpointing_and_vit_features():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", depth=2, performer_dropout=0.0).train()
    x = torch.randn(2, 1, 28, 28)
    ref = m(x)
    m.set_grad_checkpointing(True)
    out = m(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert m.tokens_to_token.attention1.kqv.weight.grad is not None and m.tokens_to_token.attention1.w.grad is None
    feats = m.forward_features(x)
    assert feats.shape == (2, 50, 128)
    assert torch.allclose(m.forward_head(feats), ref, atol=1e-6)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 128)
    m.reset_classifier(3, global_pool="avg")
    assert m(x).shape == (2, 3)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, in_chans=1)
    assert t2t_exp.vit_patch_features(vit, torch.randn(1, 1, 32, 32)).shape == (1, 192, 8, 8)


def test_model_cast_to_bf16_runs():
    torch.manual_seed(0)
    m = timm.create_model("t2t_vit_tiny_fmnist", depth=1).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = m(torch.randn(2, 1, 28, 28, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
