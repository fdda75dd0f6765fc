"""SeiT token ViTs, TokenAdapt f/g and the token-space augmentations (tokenbook.models.seit, tokenbook.methods.token_aug)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from tokenbook import references
from tokenbook.bench import count_macs, count_params
from tokenbook.models import seit as S
from tokenbook.methods.token_aug import (
    ColorAdapt, ColorChoice, EmbeddingNoise, FSpaceAugment, ReplaceSynonym, SpatialParams, SwapCode, TokenBatchAugment,
    TokenEDA, apply_spatial, build_synonyms, center_crop, color_adapt, embed_ids, load_synonyms, random_resized_crop,
    rrc_params, sample_spatial_params, save_synonyms, synonym_table, train_tokenadapt,
)
from tokenbook.data.tokens import VQTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ token ViTs
@pytest.mark.parametrize("name, params", [
    # = timm ViT-{B,S,Ti}/16 minus its 3x16x16 patch conv plus the 32x4x4 Stem-Adapter conv
    ("deit_base_token_32", 86_567_656 - (3 * 256 * 768 + 768) + (32 * 16 * 768 + 768)),
    ("deit_small_token_32", 22_050_664 - (3 * 256 * 384 + 384) + (32 * 16 * 384 + 384)),
    ("deit_tiny_token_32", 5_717_416 - (3 * 256 * 192 + 192) + (32 * 16 * 192 + 192)),
    ("deit_base_token_4", 86_567_656 - (3 * 256 * 768 + 768) + (4 * 16 * 768 + 768)),
    ("deit_small_token_4", 22_050_664 - (3 * 256 * 384 + 384) + (4 * 16 * 384 + 384)),
])
def test_parameter_counts_exact(name, params):
    m = timm.create_model(name, device="meta")
    assert count_params(m)["total"] == params
    assert params == {"deit_base_token_32": 86_371_048, "deit_small_token_32": 21_952_360,
                      "deit_tiny_token_32": 5_668_264, "deit_base_token_4": 86_026_984,
                      "deit_small_token_4": 21_780_328}[name]
    if name == "deit_base_token_32":
        vit = timm.create_model("vit_base_patch16_224", device="meta")
        assert count_params(vit)["total"] == 86_567_656


def test_stem_adapter_and_token_grid():
    m = timm.create_model("deit_base_token_32", device="meta")
    conv = m.patch_embed.proj
    assert isinstance(conv, torch.nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (32, 768, (4, 4),
                                                                                                  (2, 2), (1, 1))
    assert m.patch_embed.num_patches == 196 and m.pos_embed.shape == (1, 197, 768)
    assert m.global_pool == "avg" and isinstance(m.norm, torch.nn.Identity) and m.fc_norm.eps == 1e-6
    assert m.head.out_features == 1000
    assert count_params(timm.create_model("deit_fm_nano_token_32", device="meta"))["total"] > 0
    assert timm.create_model("deit_fm_nano_token_32", device="meta").patch_embed.num_patches == 36


def test_macs_exact_and_equal_to_vit_b16_minus_stem():
    m = timm.create_model("deit_base_token_32", device="meta")
    macs = count_macs(m, input_size=(32, 28, 28))["macs"]
    n, d = 197, 768
    block = 12 * n * d * d + 2 * n * n * d  # qkv + proj + mlp, q k^T and attn v
    assert macs == 12 * block + 196 * d * 32 * 16 + d * 1000 == 17_525_293_056
    vit = count_macs(timm.create_model("vit_base_patch16_224", device="meta"), input_size=(3, 224, 224))["macs"]
    assert vit - macs == 196 * d * (768 - 512)


def test_forward_matches_official_math_and_accepts_ids():
    torch.manual_seed(0)
    m = timm.create_model("deit_fm_nano_token_32").eval()
    x = torch.randn(3, 32, 12, 12)
    out = m(x)
    assert out.shape == (3, 10)
    # official forward_features: stem, cls, + pos, blocks, mean of patch tokens (no cls), final LN, head
    t = m.patch_embed(x)
    t = torch.cat([m.cls_token.expand(3, -1, -1), t], 1) + m.pos_embed
    t = m.blocks(t)[:, 1:].mean(1)
    torch.testing.assert_close(out, m.head(m.fc_norm(t)))
    cb = torch.randn(391, 32)
    ids = torch.randint(0, 391, (3, 14, 14))
    with pytest.raises(ValueError, match="set_codebook"):
        m(ids)
    m.set_codebook(cb)
    emb = cb[ids[:, 1:13, 1:13]].permute(0, 3, 1, 2)        # centre crop 12 of 14, start (14 - 12) // 2
    torch.testing.assert_close(m(ids), m(emb))
    assert "codebook" not in m.state_dict()
    with pytest.raises(ValueError, match=r"expected embedding maps \(B, 32, 12, 12\)"):
        m(torch.randn(2, 32, 14, 14))
    with pytest.raises(ValueError, match="smaller than the model's input"):
        m(torch.randint(0, 391, (2, 10, 10)))
    with pytest.raises(ValueError, match="even"):
        S.TokenViT(img_size=13)


def _official_state_dict(model: S.TokenViT) -> dict:
    """A state dict in the official naming: final norm ``norm.*`` and TokenAdapt tensors in the classifier."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    ta = S.TokenAdapt(in_grid=14, out_grid=12, dim=64, heads=2, dim_head=32)
    sd.update(ta.state_dict())
    return sd


def test_official_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_fm_nano_token_32").eval()
    sd = _official_state_dict(src)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "trained-vit.ckpt")
    dst = S.load_seit_checkpoint(timm.create_model("deit_fm_nano_token_32").eval(), tmp_path / "trained-vit.ckpt")
    x = torch.randn(2, 32, 12, 12)
    torch.testing.assert_close(dst(x), src(x))
    # the timm route: a local file through pretrained_cfg_overlay
    torch.save(sd, tmp_path / "sd.pth")
    m = timm.create_model("deit_fm_nano_token_32", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "sd.pth"))).eval()
    torch.testing.assert_close(m(x), src(x))
    # DeiT-style checkpoints pickle args: refused unless trusted
    import argparse
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "args.ckpt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        S.load_seit_checkpoint(timm.create_model("deit_fm_nano_token_32"), tmp_path / "args.ckpt")
    S.load_seit_checkpoint(timm.create_model("deit_fm_nano_token_32"), tmp_path / "args.ckpt", trust_pickle=True)


def test_mismatching_checkpoints_name_keys():
    m = timm.create_model("deit_fm_nano_token_32")
    sd = _official_state_dict(m)
    del sd["blocks.0.attn.qkv.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\], unexpected keys "
                                         r"\['extra.weight'\]"):
        S.checkpoint_filter_fn(sd, m)
    with pytest.raises(ValueError, match="SeiT\\+\\+"):
        S.checkpoint_filter_fn({"embeddings.word_embeddings.weight": torch.zeros(391, 32)}, m)
    sd = _official_state_dict(m)
    sd["patch_embed.proj.weight"] = torch.zeros(128, 32, 2, 2)
    with pytest.raises(ValueError, match="patch_embed.proj.weight: checkpoint \\(128, 32, 2, 2\\)"):
        S.checkpoint_filter_fn(sd, m)


# ------------------------------------------------------------------------------------------------ TokenAdapt f/g
def _official_tokenadapt_keys() -> dict[str, tuple]:
    """Key -> shape of ``conversion_function`` / ``reverse_transform`` in the official classifier (sheet 2.2)."""
    def block(prefix):
        p = f"{prefix}.transformer.layers.0"
        return {f"{p}.0.norm.weight": (384,), f"{p}.0.norm.bias": (384,), f"{p}.0.fn.to_qkv.weight": (1152, 384),
                f"{p}.0.fn.to_out.weight": (384, 384), f"{p}.0.fn.to_out.bias": (384,),
                f"{p}.1.norm.weight": (384,), f"{p}.1.norm.bias": (384,), f"{p}.1.fn.net.0.weight": (1536, 384),
                f"{p}.1.fn.net.0.bias": (1536,), f"{p}.1.fn.net.2.weight": (384, 1536), f"{p}.1.fn.net.2.bias": (384,),
                f"{prefix}.transformer.norm.weight": (384,), f"{prefix}.transformer.norm.bias": (384,)}
    keys = {"conversion_function.0.weight": (384, 32), "conversion_function.0.bias": (384,),
            "conversion_function.1.de_pos_embedding": (1, 1024, 384),
            "conversion_function.1.to_pixel.1.weight": (384, 32, 2, 2), "conversion_function.1.to_pixel.1.bias": (32,),
            "reverse_transform.0.to_patch_embedding.0.weight": (384, 32, 2, 2),
            "reverse_transform.0.to_patch_embedding.0.bias": (384,),
            "reverse_transform.0.en_pos_embedding": (1, 784, 384),
            "reverse_transform.1.weight": (391, 384), "reverse_transform.1.bias": (391,)}
    keys.update(block("conversion_function.1"))
    keys.update(block("reverse_transform.0"))
    return keys


def test_tokenadapt_module_names_and_parameter_counts():
    ta = S.TokenAdapt()
    assert {k: tuple(v.shape) for k, v in ta.state_dict().items()} == _official_tokenadapt_keys()
    block = 2 * 384 + 384 * 1152 + 384 * 384 + 384 + 2 * 384 + 384 * 1536 + 1536 + 1536 * 384 + 384 + 2 * 384
    f = 32 * 384 + 384 + block + 384 * 32 * 4 + 32
    g = 32 * 384 * 4 + 384 + block + 384 * 391 + 391
    assert (block, f, g) == (1_774_080, 1_835_936, 1_974_151)
    c = count_params(ta)
    assert c["trainable"] == f + g == 3_810_087
    assert c["total"] == f + g + 1024 * 384 + 784 * 384
    assert not ta.conversion_function[1].de_pos_embedding.requires_grad


def test_sincos_table_formula():
    pe = S.sincos_pos_embed_2d(8, (3, 4))        # 3 rows, 4 cols, dim 8: [sin c, sin c w1, cos c, cos c w1, same for r]
    assert pe.shape == (12, 8)
    r, c = 2, 3
    w = torch.tensor([1.0, 1.0 / 100.0])        # 10000 ** (-k / 2), k = 0, 1
    expect = torch.cat([torch.sin(c * w), torch.cos(c * w), torch.sin(r * w), torch.cos(r * w)])
    torch.testing.assert_close(pe[r * 4 + c], expect)
    table = S.TokenAdapt().reverse_transform[0].en_pos_embedding[0]
    torch.testing.assert_close(table, S.sincos_pos_embed_2d(384, (28, 28)))


def test_tokenadapt_shapes_and_loading():
    torch.manual_seed(0)
    ta = S.TokenAdapt().eval()
    x = torch.randn(2, 32, 32, 32)
    with torch.no_grad():
        f = ta.forward_conversion(x)
        assert f.shape == (2, 32, 64, 64)
        logits = ta.forward_logits(f[..., 4:60, 4:60])
        assert logits.shape == (2, 391, 28, 28)
        ids = ta.forward_inversion(f[..., 4:60, 4:60])
        assert ids.shape == (2, 28, 28) and torch.equal(ids, logits.argmax(1))
        assert torch.equal(ta(x), ids)
    with pytest.raises(ValueError, match=r"g expects \(B, 32, 56, 56\)"):
        ta.forward_logits(f)
    # an in-memory checkpoint in the official layout (plus classifier keys that must be ignored)
    sd = {k: torch.randn(s) for k, s in _official_tokenadapt_keys().items()}
    sd["head.weight"] = torch.zeros(1000, 768)
    loaded = S.load_tokenadapt({"model": sd})
    assert (loaded.in_grid, loaded.out_grid, loaded.codebook_size) == (32, 28, 391)
    torch.testing.assert_close(loaded.reverse_transform[1].weight, sd["reverse_transform.1.weight"])
    del sd["reverse_transform.1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['reverse_transform.1.bias'\]"):
        S.load_tokenadapt(sd, S.TokenAdapt())
    with pytest.raises(ValueError, match="no conversion_function"):
        S.load_tokenadapt({"head.weight": torch.zeros(2, 2)})
    # partial checkpoint without module=: the documented ValueError naming the missing keys, not a KeyError
    partial = {k: v for k, v in sd.items() if not k.startswith("reverse_transform.1.")}
    both = r"missing keys \['reverse_transform.1.bias', 'reverse_transform.1.weight'\]"
    with pytest.raises(ValueError, match=both):
        S.load_tokenadapt(partial)
    with pytest.raises(ValueError, match=r"missing keys \['reverse_transform.1.bias'\]"):
        S.load_tokenadapt(sd)


def test_attention_fused_and_explicit_agree():
    torch.manual_seed(0)
    attn = S._Attention(64, heads=2, dim_head=32)
    x = torch.randn(2, 10, 64)
    attn.fused_attn = True
    a = attn(x)
    attn.fused_attn = False
    torch.testing.assert_close(a, attn(x), atol=1e-5, rtol=1e-5)


def test_train_tokenadapt_reduces_loss():
    torch.manual_seed(0)
    tok = VQTokenizer(in_chans=1, downsample=2, codebook_size=40, hidden=8)
    ta = S.TokenAdapt(codebook_size=40, in_grid=14, out_grid=12, dim=32, heads=2, dim_head=16)
    imgs = torch.rand(8, 1, 28, 28)
    hist = train_tokenadapt(ta, tok, [imgs], steps=6, lr=3e-3, log_every=5, mix_prob=0.5,
                              generator=torch.Generator().manual_seed(0))
    assert [h["step"] for h in hist] == [1, 5, 6]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert not ta.training and ta.conversion_function[0].weight.requires_grad
    with pytest.raises(ValueError, match="codebook"):
        train_tokenadapt(ta, tok, [imgs], steps=1, codebook=torch.randn(391, 32))


# ------------------------------------------------------------------------------------------------ ColorAdapt / noise
def test_coloradapt_statistics_match_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 6) * torch.rand(5, 4, 1, 1) * 3 + torch.randn(5, 4, 1, 1)
    y = color_adapt(x)
    mu, sd = x.mean((2, 3)), x.std((2, 3))                   # unbiased std, as torch's default
    torch.testing.assert_close(y.mean((2, 3)), mu.flip(0))
    torch.testing.assert_close(y.std((2, 3)), sd.flip(0))
    torch.testing.assert_close(y[1], (x[1] - mu[1, :, None, None]) / sd[1, :, None, None] * sd[3, :, None, None]
                               + mu[3, :, None, None])
    torch.testing.assert_close(y[2], x[2])                  # odd batch: the middle sample is its own partner
    out = ColorAdapt(prob=0.5)(x, generator=torch.Generator().manual_seed(1))
    changed = [i for i in range(5) if not torch.allclose(out[i], x[i])]
    assert len(changed) in (1, 2) and all(torch.allclose(out[i], y[i]) for i in changed)  # int(5 * 0.5) = 2 picked
    const = torch.ones(2, 1, 3, 3)
    assert torch.isnan(color_adapt(const)).all() and torch.isfinite(color_adapt(const, eps=1e-5)).all()


def test_embedding_noise_hits_exactly_half():
    x = torch.zeros(8, 4, 5, 5)
    y = EmbeddingNoise(prob=0.5)(x, generator=torch.Generator().manual_seed(0))
    hit = (y != 0).flatten(1).any(1)
    assert int(hit.sum()) == 4 and torch.equal(x, torch.zeros_like(x))


def test_color_choice_per_batch():
    x = torch.randn(4, 3, 5, 5)
    c = ColorChoice(noise_prob=1.0, coloradapt_prob=0.0)
    c(x)
    assert c.last_choice == "noise"
    c = ColorChoice(noise_prob=0.0, coloradapt_prob=1.0)
    c(x)
    assert c.last_choice == "coloradapt"
    c = ColorChoice(0.0, 0.0)
    assert c(x) is x and c.last_choice == "identity"
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        ColorChoice(0.8, 0.3)
    c = ColorChoice(0.75, 0.25)
    g = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(400):
        c(x, g)
        picks.append(c.last_choice)
    assert 0.65 < picks.count("noise") / 400 < 0.85 and "identity" not in picks


# ------------------------------------------------------------------------------------------------ Token-EDA
def test_synonyms_from_codebook_neighbours(tmp_path):
    cb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.1, 0.9]])
    syn = build_synonyms(cb, top=2)
    assert syn["0"] == [1, 4] and syn["2"] == [5, 4]
    assert all(int(k) not in v for k, v in syn.items())
    p = save_synonyms(syn, tmp_path / "synonyms.json")
    assert json.loads(p.read_text())["0"] == [1, 4] and load_synonyms(p) == syn
    table, counts = synonym_table({"0": [1, 2, 3, 4, 5, 6], "1": []}, num_codes=7, top=5)
    assert table[0].tolist() == [1, 2, 3, 4, 5] and counts.tolist() == [5, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        synonym_table({"0": [9]}, num_codes=3)


def test_replace_synonym_and_swap():
    cb = torch.randn(50, 8)
    syn = build_synonyms(cb, top=5)
    ids = torch.randint(0, 50, (8, 8))
    allrep = ReplaceSynonym(syn, top=5, prob=1.0)(ids)
    assert all(int(n) in syn[str(int(o))][:5] for o, n in zip(ids.flatten(), allrep.flatten()))
    assert torch.equal(ReplaceSynonym(syn, prob=0.0)(ids), ids)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = SwapCode(scale=(0.25, 0.25))(ids, g)                 # ps = 2: blocks never overlap
        assert (out != ids).sum() <= 8 and torch.equal(out.flatten().sort().values, ids.flatten().sort().values)
    assert torch.equal(SwapCode(scale=(0.0, 0.0))(ids), ids)
    with pytest.raises(ValueError, match="synonym dictionary"):
        TokenEDA(None)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        TokenEDA(syn, synonym_prob=0.7, swap_prob=0.5)
    eda = TokenEDA(syn)
    outs = [eda(ids, g) for _ in range(200)]
    same = sum(torch.equal(o, ids) for o in outs) / 200
    assert 0.4 < same < 0.75 and all(o.shape == ids.shape and o.dtype == ids.dtype for o in outs)


# ------------------------------------------------------------------------------------------------ crops and f-space
def test_crops():
    assert all(0 <= i and 0 <= j and i + h <= 32 and j + w <= 32 for i, j, h, w in
               (rrc_params(32, 32, generator=torch.Generator().manual_seed(s)) for s in range(50)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(center_crop(x, 28), x[..., 2:30, 2:30])
    torch.testing.assert_close(random_resized_crop(x, 32, scale=(1, 1), ratio=(1, 1)), x)
    # RRC on the one-hot map then codebook == RRC on the embedding map (both linear; sheet 1.4)
    cb = torch.randn(20, 4)
    ids = torch.randint(0, 20, (2, 16, 16))
    onehot = F.one_hot(ids, 20).permute(0, 3, 1, 2).float()
    a = random_resized_crop(onehot, 14, generator=torch.Generator().manual_seed(3))
    a = torch.einsum("bkhw,kd->bdhw", a, cb)
    b = random_resized_crop(embed_ids(ids, cb), 14, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fspace_spatial_params():
    x = torch.randn(4, 2, 16, 16)
    ident = [SpatialParams() for _ in range(4)]
    torch.testing.assert_close(apply_spatial(x, ident, 16), x)
    flip = [SpatialParams(flip=True) for _ in range(4)]
    torch.testing.assert_close(apply_spatial(x, flip, 16), x.flip(-1))
    g = torch.Generator().manual_seed(0)
    batch = sample_spatial_params(6, 16, 16, per_sample=False, apply_p=1.0, op_p=1.0, generator=g)
    assert all(p.flip == batch[0].flip and p.ops == batch[0].ops for p in batch) and len(batch[0].ops) == 5
    per = [sample_spatial_params(6, 16, 16, per_sample=True, generator=g) for _ in range(5)]
    assert any(len({(p.flip, len(p.ops)) for p in ps}) > 1 for ps in per)
    assert FSpaceAugment(12)(x, g).shape == (4, 2, 12, 12)


# ------------------------------------------------------------------------------------------------ batch hook
def test_batch_hook_shapes_targets_and_modes():
    torch.manual_seed(0)
    cb = torch.randn(391, 32)
    ids, y = torch.randint(0, 391, (8, 14, 14)), torch.randint(0, 10, (8,))
    ta = S.TokenAdapt(in_grid=14, out_grid=12, dim=32, heads=2, dim_head=16)
    for hook in (TokenBatchAugment.seit(cb, 10, crop=12), TokenBatchAugment.forging(cb, 10, crop=12),
                 TokenBatchAugment.forging(cb, 10, crop=12, tokenadapt=ta),
                 TokenBatchAugment.forging(cb, 10, crop=12, tokenadapt=ta, per_sample=False, coloradapt=False)):
        x, t = hook.on_batch((ids, y))
        assert x.shape == (8, 32, 12, 12) and t.shape == (8, 10)
        torch.testing.assert_close(t.sum(1), torch.ones(8))
        assert t.min() > 0                                          # label smoothing 0.1
    assert not any(p.requires_grad for p in ta.parameters())        # frozen as in classifier training
    hook = TokenBatchAugment.forging(cb, 10, crop=12, tokenadapt=ta)
    with pytest.raises(ValueError, match="divisible by 4"):
        hook.on_batch((ids[:6], y[:6]))
    model = timm.create_model("deit_fm_nano_token_32")
    hook.on_fit_start(None, model.eval())
    assert hook.on_batch((ids, y))[0] is ids                       # eval batches pass through
    # without noise/ColorAdapt/CutMix the base path is exactly RRC of the embedding map
    plain = TokenBatchAugment(cb, 10, crop=14, noise_prob=0.0, coloradapt_prob=0.0, cutmix_alpha=0.0,
                              rrc_scale=(1.0, 1.0), label_smoothing=0.0)
    x, t = plain(ids, y)
    torch.testing.assert_close(x, embed_ids(ids, cb), atol=1e-5, rtol=1e-5)
    assert torch.equal(t.argmax(1), y) and x.shape == (8, 32, 14, 14)


# ------------------------------------------------------------------------------------------------ references
def test_reference_file_validates():
    refs = references.load("seit")
    ids = {r.id: r for r in refs}
    assert ids["tabB.seit.1.4gb"].value == 74.0 and ids["tabB.seit.1.4gb"].kind == "third_party"
    assert ids["tokens.codebook_size"].value == 391 and ids["tokens.per_image"].value == 1024
    assert ids["recipe.lr"].value == pytest.approx(7.5e-4 * 1024 / 512)
    assert {r.kind for r in refs} <= {"paper", "official_code", "computed", "third_party"}


def test_token_device_follows_the_accelerator(monkeypatch):
    from tokenbook.experiments.seit import token_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert token_device("auto") == token_device("cuda") == token_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert token_device("auto") == token_device("cuda:0") == token_device("gpu") == "cuda"
    assert token_device("cpu") == "cpu"
