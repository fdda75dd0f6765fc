"""Tests for tokenbook.models.vittm (ViTTM, issue 3). Reference: ../shared/papers/vittm.md.

Large models (ViTTM-S/B at 224 px) are built on the meta device: parameter counts, used-parameter counts (autograd
works on meta tensors), MACs (FlopCounterMode only needs shapes) and checkpoint key/shape matching need no memory.
"""
from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenbook.models.vittm as V
from tokenbook import references
from tokenbook.experiments import vittm as X
from tokenbook.bench import count_macs, count_used_params
from tokenbook.train import TrainConfig, all_heads, evaluate, fit

# a small configuration used by most behavioural tests
SMALL = dict(img_size=28, memory_ps=4, process_ps=7, embed_dim=32, depth=2, num_heads=4, num_classes=5,
             latent_size_scale=2)


def small_model(**kw) -> V.ViTTM:
    torch.manual_seed(0)
    return V.ViTTM(**{**SMALL, **kw})


def nonzero_heads(model: V.ViTTM) -> V.ViTTM:
    with torch.no_grad():
        for h in (model.head, model.process_head):
            h.weight.normal_(0, 0.1)
            h.bias.normal_(0, 0.1)
    return model


def meta_model(name: str, **kw) -> V.ViTTM:
    with torch.device("meta"):
        return timm.create_model(name, **kw)


@functools.lru_cache(maxsize=None)
def shared_meta_model(name: str) -> V.ViTTM:
    """A cached meta-device model for read-only uses (counting, key matching)."""
    return meta_model(name)


# ----------------------------------------------------------------------------------------------------------------------
# official-format state dicts, built from the key table of the reference sheet (§3.1, §3.2), not from our model
# ----------------------------------------------------------------------------------------------------------------------
def official_state_dict(d: int, depth: int, latent: int, mem_tokens: int, proc_tokens: int, mem_ps: int,
                        proc_ps: int, num_classes: int = 1000, device: str = "cpu", in_chans: int = 3,
                        seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Official EfficientTTMs ViTTM state dict (lin heads, residual fusion, patch embedder) in its key order."""
    g = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, d)), ("pos_embed", (1, 197, d)),
        ("process_pos_embed", (1, proc_tokens, d)), ("memory_pos_embed", (1, mem_tokens, d)),
        ("patch_embed.proj.weight", (d, in_chans, 16, 16)), ("patch_embed.proj.bias", (d,)),
    ]
    for i in range(depth):
        shapes += [(f"blocks.{i}.norm1.weight", (d,)), (f"blocks.{i}.norm1.bias", (d,)),
                   (f"blocks.{i}.attn.qkv.weight", (3 * d, d)), (f"blocks.{i}.attn.qkv.bias", (3 * d,)),
                   (f"blocks.{i}.attn.proj.weight", (d, d)), (f"blocks.{i}.attn.proj.bias", (d,)),
                   (f"blocks.{i}.norm2.weight", (d,)), (f"blocks.{i}.norm2.bias", (d,)),
                   (f"blocks.{i}.mlp.fc1.weight", (4 * d, d)), (f"blocks.{i}.mlp.fc1.bias", (4 * d,)),
                   (f"blocks.{i}.mlp.fc2.weight", (d, 4 * d)), (f"blocks.{i}.mlp.fc2.bias", (d,))]
    shapes += [("fc_norm.weight", (d,)), ("fc_norm.bias", (d,)),
               ("head.weight", (num_classes, d)), ("head.bias", (num_classes,)),
               ("memory_embedder.proj.weight", (d, in_chans, mem_ps, mem_ps)), ("memory_embedder.proj.bias", (d,)),
               ("process_embedder.proj.weight", (d, in_chans, proc_ps, proc_ps)), ("process_embedder.proj.bias", (d,))]
    shapes += [(f"read_norm.{i}.{p}", (d,)) for i in range(depth) for p in ("weight", "bias")]
    shapes += [(f"write_norm.{i}.{p}", (d,)) for i in range(depth) for p in ("weight", "bias")]
    shapes += [("process_norm.weight", (d,)), ("process_norm.bias", (d,)),
               ("process_head.weight", (num_classes, d)), ("process_head.bias", (num_classes,)),
               ("fc_norm_process.weight", (d,)), ("fc_norm_process.bias", (d,))]
    for which in ("write_head", "read_head"):
        for i in range(depth):
            shapes += [(f"{which}.{i}.q.weight", (latent, d)), (f"{which}.{i}.q.bias", (latent,)),
                       (f"{which}.{i}.k.weight", (latent, d)), (f"{which}.{i}.k.bias", (latent,)),
                       (f"{which}.{i}.v.weight", (d, d)), (f"{which}.{i}.v.bias", (d,)),
                       (f"{which}.{i}.proj.weight", (d, d)), (f"{which}.{i}.proj.bias", (d,))]
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, s in shapes:
        if device == "meta":
            sd[k] = torch.empty(s, device="meta")
        elif k.endswith(".weight") and len(s) == 1:  # LayerNorm scales
            sd[k] = 1.0 + 0.1 * torch.randn(s, generator=g)
        else:
            fan_in = s[-1] if len(s) > 1 else 1
            sd[k] = torch.randn(s, generator=g) * (0.5 / math.sqrt(fan_in) if len(s) > 1 else 0.05)
    return sd


def official_option_shapes(d: int, depth: int, heads: int, latent: int, mem_tokens: int, proc_tokens: int,
                           rw: str, fusion: str, mem_blocks: str, mem_ratio: float = 0.5) -> list[tuple[str, tuple]]:
    """Official key names and shapes of the option-dependent modules, written from the official module tree
    (``models/vittm/rw_heads.py``, ``fusion.py``, ``memblocks.py``; reference sheet §1.7-1.10), not from our model:
    the per-layer read/write heads (``read_head`` sized by the process tokens, ``write_head`` by the memory tokens for
    ``tl``), the add_erase gates and the mlp memory blocks."""
    def head(p, n_out):
        if rw == "lin":  # LinearAttention: q, k (d -> c), v (d -> d), unused proj
            return [(f"{p}.q.weight", (latent, d)), (f"{p}.q.bias", (latent,)), (f"{p}.k.weight", (latent, d)),
                    (f"{p}.k.bias", (latent,)), (f"{p}.v.weight", (d, d)), (f"{p}.v.bias", (d,)),
                    (f"{p}.proj.weight", (d, d)), (f"{p}.proj.bias", (d,))]
        if rw == "tl":  # TokenLearner: mlp d -> T -> T (bottleneck = output count), norm over d
            return [(f"{p}.mlp.fc1.weight", (n_out, d)), (f"{p}.mlp.fc1.bias", (n_out,)),
                    (f"{p}.mlp.fc2.weight", (n_out, n_out)), (f"{p}.mlp.fc2.bias", (n_out,)),
                    (f"{p}.norm.weight", (d,)), (f"{p}.norm.bias", (d,))]
        if rw in ("ca", "lca"):  # CrossAttention (c = d) / LatentCrossAttention: q, q_norm, k, k_norm, v, v_norm, proj
            c = d if rw == "ca" else latent
            return [(f"{p}.q.weight", (c, d)), (f"{p}.q.bias", (c,)), (f"{p}.q_norm.weight", (c,)),
                    (f"{p}.q_norm.bias", (c,)), (f"{p}.k.weight", (c, d)), (f"{p}.k.bias", (c,)),
                    (f"{p}.k_norm.weight", (c,)), (f"{p}.k_norm.bias", (c,)), (f"{p}.v.weight", (d, d)),
                    (f"{p}.v.bias", (d,)), (f"{p}.v_norm.weight", (d,)), (f"{p}.v_norm.bias", (d,)),
                    (f"{p}.proj.weight", (d, d)), (f"{p}.proj.bias", (d,))]
        assert rw == "la"  # LatentAttention: mlp (source) and mlp2 (queries) d -> 64 -> c, norm, norm_q
        return [(f"{p}.{m}.{k}", s) for m in ("mlp", "mlp2") for k, s in (
            ("fc1.weight", (64, d)), ("fc1.bias", (64,)), ("fc2.weight", (latent, 64)), ("fc2.bias", (latent,)))] + [
            (f"{p}.{n}.{k}", (d,)) for n in ("norm", "norm_q") for k in ("weight", "bias")]

    shapes = []
    if mem_blocks == "mlp":  # MemMlpBlock: norm, mlp d -> ratio d -> d
        hid = int(d * mem_ratio)
        for i in range(depth):
            shapes += [(f"mem_blocks.{i}.norm.weight", (d,)), (f"mem_blocks.{i}.norm.bias", (d,)),
                       (f"mem_blocks.{i}.mlp.fc1.weight", (hid, d)), (f"mem_blocks.{i}.mlp.fc1.bias", (hid,)),
                       (f"mem_blocks.{i}.mlp.fc2.weight", (d, hid)), (f"mem_blocks.{i}.mlp.fc2.bias", (d,))]
    for which, n_out in (("write_head", mem_tokens), ("read_head", proc_tokens)):
        for i in range(depth):
            shapes += head(f"{which}.{i}", n_out)
    if fusion == "add_erase":  # AddEraseFusion: linear d -> target token count
        shapes += [("read_fusion.linear.weight", (proc_tokens, d)), ("read_fusion.linear.bias", (proc_tokens,)),
                   ("write_fusion.linear.weight", (mem_tokens, d)), ("write_fusion.linear.bias", (mem_tokens,))]
    return shapes


def official_format(model: V.ViTTM, shapes: list[tuple[str, tuple]]) -> "OrderedDict[str, torch.Tensor]":
    """``model``'s weights as an official checkpoint: every key of the official model (``shapes`` for the options,
    the fixed part from :func:`official_state_dict`), our tensors under those names, the tensors the official model
    has but never uses (cls_token, pos_embed, 16x16 patch_embed, lin proj) filled with noise. Fails if a name or
    shape of ours differs from the official one."""
    d, depth = model.embed_dim, model.depth
    fixed = official_state_dict(d, depth, 1, model.num_memory_tokens, model.num_process_tokens, model.memory_ps,
                                model.process_ps, num_classes=model.num_classes)
    fixed = [(k, tuple(v.shape)) for k, v in fixed.items() if not k.startswith(("read_head.", "write_head."))]
    ours = model.state_dict()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, shape in fixed + shapes:
        if k in ours:
            assert tuple(ours[k].shape) == shape, (k, tuple(ours[k].shape), shape)
            out[k] = ours[k].clone()
        else:
            assert re.match(r"^(cls_token|pos_embed|patch_embed\..*|(read|write)_head\.\d+\.proj\..*)$", k), k
            out[k] = torch.randn(shape)
    assert set(ours) <= set(out), sorted(set(ours) - set(out))
    return out


def compiled(sd):
    return OrderedDict((f"_orig_mod.{k}", v) for k, v in sd.items())


def ema(sd):
    out = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    out["n_averaged"] = torch.tensor(123)
    return out


def reference_forward(sd: dict, x: torch.Tensor, mem_ps: int, proc_ps: int, heads: int, depth: int):
    """Independent functional ViTTM forward from the reference sheet §1.5-1.7, reading the official state dict.
    The lin heads are computed with the explicit (quadratic) attention map, not the associative order."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def lin(p, t):
        return t @ sd[p + ".weight"].T + sd[p + ".bias"]

    def embed(p, ps, pos):
        t = F.conv2d(x, sd[p + ".proj.weight"], sd[p + ".proj.bias"], stride=ps)
        return t.flatten(2).transpose(1, 2) + sd[pos]

    def lin_head(p, src, qry):
        B, N, d = src.shape
        M = qry.shape[1]
        q = (F.elu(lin(p + ".q", qry)) + 1).view(B, M, heads, -1).transpose(1, 2)
        k = (F.elu(lin(p + ".k", src)) + 1).view(B, N, heads, -1).transpose(1, 2)
        v = lin(p + ".v", src).view(B, N, heads, -1).transpose(1, 2)
        a = q @ k.transpose(-1, -2)
        a = a / (a.sum(-1, keepdim=True) + 1e-6)
        return (a @ v).transpose(1, 2).reshape(B, M, d)

    def block(p, t):
        B, N, d = t.shape
        h = ln(t, p + ".norm1")
        qkv = lin(p + ".attn.qkv", h).view(B, N, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
        t = t + lin(p + ".attn.proj", (a @ qkv[2]).transpose(1, 2).reshape(B, N, d))
        return t + lin(p + ".mlp.fc2", F.gelu(lin(p + ".mlp.fc1", ln(t, p + ".norm2"))))

    M = embed("memory_embedder", mem_ps, "memory_pos_embed")
    P = embed("process_embedder", proc_ps, "process_pos_embed")
    for i in range(depth):
        M, P = ln(M, f"read_norm.{i}"), ln(P, f"read_norm.{i}")
        P = P + lin_head(f"read_head.{i}", M, P)
        P = block(f"blocks.{i}", P)
        M, P = ln(M, f"write_norm.{i}"), ln(P, f"write_norm.{i}")
        M = M + lin_head(f"write_head.{i}", P, M)
    P = ln(P, "process_norm")
    mem_logits = lin("head", ln(M.mean(1), "fc_norm"))
    proc_logits = lin("process_head", ln(P.mean(1), "fc_norm_process"))
    return mem_logits, proc_logits


# ----------------------------------------------------------------------------------------------------------------------
# registry, shapes, options
# ----------------------------------------------------------------------------------------------------------------------
def test_registered_names_and_cfgs():
    names = set(timm.list_models("vittm_*"))
    assert set(V.MODEL_NAMES) <= names
    # the released ViTTM-B-28 weights have a tag (no download url: the file is passed with pretrained_cfg_overlay)
    assert timm.models.get_pretrained_cfg("vittm_base_m28p28_224.official_in1k").num_classes == 1000
    b = meta_model("vittm_base_m28p28_224")
    cfg = b.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == ("head", "process_head")
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    # paper config: 28/28, lin, c = d/4, residual; 64 + 64 tokens
    assert (b.memory_ps, b.process_ps, b.rw_head_type, b.fusion_type, b.latent_size_scale) == (
        28, 28, "lin", "residual", 4)
    assert (b.num_memory_tokens, b.num_process_tokens, b.embed_dim, b.num_heads, b.depth) == (64, 64, 768, 12, 12)
    assert b.read_head[0].latent_dim == 192
    s = meta_model("vittm_small_m28p28_224")
    assert (s.embed_dim, s.num_heads, s.read_head[0].latent_dim, s.num_memory_tokens, s.num_process_tokens) == (
        384, 6, 96, 64, 64)
    s16 = meta_model("vittm_small_m16p32_224")
    assert (s16.num_memory_tokens, s16.num_process_tokens) == (196, 49)
    # CPU variants keep the token ratios: 64/64 at 32 px, 49/49 and 196/49 at 28 px; 16/16 (7 px) is the cpu scale
    assert [(m.num_memory_tokens, m.num_process_tokens) for m in (
        meta_model("vittm_cpu_m4p4_32"), meta_model("vittm_cpu_m4p4_28"), meta_model("vittm_cpu_m2p4_28"),
        meta_model("vittm_cpu_m7p7_28"))] == [(64, 64), (49, 49), (196, 49), (16, 16)]
    m7 = meta_model("vittm_cpu_m7p7_28")
    assert m7.pretrained_cfg == {**meta_model("vittm_cpu_m4p4_28").pretrained_cfg, "architecture": "vittm_cpu_m7p7_28"}
    assert (m7.memory_ps, m7.process_ps, m7.rw_head_type, m7.fusion_type, m7.latent_size_scale) == (
        7, 7, "lin", "residual", 4)
    # CPU variants: same width/depth/normalization as the lead's small ViT baseline
    cpu, vit = meta_model("vittm_cpu_m4p4_28"), meta_model("vit_fm_small_p4_28")
    assert (cpu.embed_dim, cpu.depth, cpu.num_heads) == (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads)
    assert cpu.pretrained_cfg["mean"] == vit.pretrained_cfg["mean"] and cpu.num_classes == 10
    # every option is a keyword argument of the registered names
    m = meta_model("vittm_cpu_m4p4_28", rw_head_type="ca", fusion_type="erase", memory_blocks="mlp", num_classes=3)
    assert isinstance(m.read_head[0], V.CrossAttentionHead) and m.fusion_type == "erase" and m.num_classes == 3


@pytest.mark.parametrize("head", V.RW_HEAD_TYPES)
@pytest.mark.parametrize("fusion", V.FUSION_TYPES)
def test_shapes_every_head_and_fusion(head, fusion):
    m = small_model(rw_head_type=head, fusion_type=fusion)
    x = torch.randn(2, 3, 28, 28)
    mem, proc = m.forward_features(x)
    assert mem.shape == (2, 49, 32) and proc.shape == (2, 16, 32)
    out = m(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 5), (2, 5)]
    # official init: both classifiers start at zero
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[1]) == 0
    # no parameter that forward does not use
    assert count_used_params(m, x) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("kw", [dict(memory_blocks="mlp"), dict(memory_blocks=""),
                                dict(process_embedder_type="latent"),
                                dict(process_embedder_type="latent", process_tokens=9)])
def test_memory_blocks_and_latent_embedder(kw):
    m = small_model(**kw)
    x = torch.randn(2, 3, 28, 28)
    mem, proc = m.forward_features(x)
    assert mem.shape == (2, 49, 32)
    assert proc.shape == (2, kw.get("process_tokens", 16), 32)
    assert count_used_params(m, x) == sum(p.numel() for p in m.parameters())
    if kw.get("memory_blocks") == "mlp":
        assert isinstance(m.mem_blocks[0], V.MemoryMlpBlock)
        assert m.mem_blocks[0].mlp.fc1.out_features == 16  # hidden 0.5 d
    if kw.get("process_embedder_type") == "latent":
        assert not hasattr(m, "process_embedder") and m.process_latent.shape == (1, m.num_process_tokens, 32)
        # learned process tokens do not depend on the image, memory does
        mem2, _ = m.forward_features(torch.randn(2, 3, 28, 28))
        assert not torch.allclose(mem, mem2)


def test_gradients_reach_both_streams_from_each_head():
    m = nonzero_heads(small_model())
    x = torch.randn(2, 3, 28, 28)
    mem_logits, proc_logits = m(x)
    # memory logits reach the process embedder only through the writes
    g = torch.autograd.grad(mem_logits.square().sum(), [m.process_embedder.proj.weight, m.memory_embedder.proj.weight],
                            retain_graph=True)
    assert all(t.abs().sum() > 0 for t in g)
    # process logits reach the memory embedder only through the reads
    g = torch.autograd.grad(proc_logits.square().sum(), [m.memory_embedder.proj.weight, m.write_head[0].v.weight])
    assert g[0].abs().sum() > 0
    assert g[1].abs().sum() > 0  # write of layer 0 feeds the read of layer 1
    # and the loss is the sum over both heads
    y = torch.tensor([0, 3])
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(V.vittm_loss((mem_logits, proc_logits), y, ce), ce(mem_logits, y) + ce(proc_logits, y))


@pytest.mark.parametrize("eval_head", ["memory", "process"])
def test_eval_returns_one_tensor_and_both_heads_on_request(eval_head):
    """timm's two-head convention (distilled DeiT): one tensor in eval(), both heads in training or on request."""
    m = nonzero_heads(small_model(eval_head=eval_head))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        both = m(x)  # training mode: both heads, memory first
        mem_tok, proc_tok = m.forward_features(x)
        assert isinstance(both, tuple) and len(both) == 2
        m.eval()
        out = m(x)
        assert torch.is_tensor(out) and out.shape == (2, 5)
        torch.testing.assert_close(out, both[V.ViTTM.head_names.index(eval_head)])
        feats = m.forward_features(x)
        assert torch.is_tensor(feats)
        torch.testing.assert_close(feats, mem_tok if eval_head == "memory" else proc_tok)
        torch.testing.assert_close(m.forward_head(feats), out)
        pre = m.forward_head(feats, pre_logits=True)
        assert torch.is_tensor(pre) and pre.shape == (2, 32)
        # the (memory, process) pair given to forward_head in eval gives the eval head too
        torch.testing.assert_close(m.forward_head((mem_tok, proc_tok)), out)
        m.set_all_heads(True)
        again = m(x)
        assert isinstance(again, tuple) and all(torch.allclose(a, b) for a, b in zip(again, both))
        assert isinstance(m.forward_features(x), tuple)
        assert [t.shape for t in m.forward_head(m.forward_features(x), pre_logits=True)] == [(2, 32), (2, 32)]
        m.set_all_heads(False)
        assert torch.is_tensor(m(x))
        # trace keeps both heads in every mode
        assert len(m.trace(x, maps=False)["logits"]) == 2
    with pytest.raises(ValueError, match="unknown eval_head 'mean'"):
        small_model(eval_head="mean")


def test_train_evaluate_and_fit_report_both_heads():
    """fit()/evaluate() ask for all heads through the return_all_heads protocol and restore it afterwards."""
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 3, 28, 28, generator=g), torch.arange(16) % 5)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    m = nonzero_heads(small_model(depth=1)).eval()
    res = evaluate(m, loader)
    assert {"top1_memory", "top1_process", "top5_memory", "loss_process"} <= set(res)
    assert res["top1"] == res["top1_memory"] and not m.return_all_heads and not m.training
    with torch.no_grad():
        logits = m(ds.tensors[0])
    assert res["top1_memory"] == pytest.approx(100.0 * (logits.argmax(-1) == ds.tensors[1]).float().mean().item())
    r = fit(small_model(depth=1), loader, loader, TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, progress=False,
                                                               accelerator="cpu"))
    assert r.head_names == ["memory", "process"]
    assert {"val_top1_memory", "val_top1_process"} <= set(r.final)
    assert not r.model.return_all_heads


def test_streams_are_renormalized_before_read_and_write():
    """The normalized tensors replace the streams (official quirk): the memory fed to layer 1 is write-normalized, so
    the read in layer 1 sees LN_r(LN_w(M) + write)."""
    m = small_model()
    x = torch.randn(1, 3, 28, 28)
    rec = m.trace(x, maps=False)
    with torch.no_grad():
        mem0, _ = m.embed(x)
        normed = m.write_norm[0](m.read_norm[0](mem0))
        torch.testing.assert_close(rec["mem_before_write"][0], normed)
        torch.testing.assert_close(rec["memory"][0], normed + rec["write"][0])


# ----------------------------------------------------------------------------------------------------------------------
# explicit attention maps
# ----------------------------------------------------------------------------------------------------------------------
def test_lin_associative_equals_explicit_map():
    torch.manual_seed(1)
    head = V.LinearAttentionHead(64, num_heads=4, latent_size_scale=4).double()
    src, qry = torch.randn(3, 20, 64, dtype=torch.double), torch.randn(3, 11, 64, dtype=torch.double)
    a = head.attention_map(src, qry)
    assert a.shape == (3, 4, 11, 20)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 11, dtype=torch.double), rtol=1e-5, atol=1e-5)
    v = head.v(src).view(3, 20, 4, 16).transpose(1, 2)
    explicit = (a @ v).transpose(1, 2).reshape(3, 11, 64)
    torch.testing.assert_close(head(src, qry), explicit, rtol=1e-10, atol=1e-10)
    # elu + 1 feature map, no scaling, eps 1e-6, no output projection
    assert not hasattr(head, "proj") and head.eps == 1e-6
    q = F.elu(head.q(qry)) + 1
    k = F.elu(head.k(src)) + 1
    s = q[..., :4] @ k[..., :4].transpose(1, 2)
    torch.testing.assert_close(a[:, 0], s / (s.sum(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("head_type", ["tl", "ca", "la", "lca"])
def test_other_heads_equal_their_explicit_maps(head_type):
    torch.manual_seed(2)
    d, h, N, M = 32, 4, 12, 7
    head = V._make_rw_head(head_type, d, h, 2, M, True).double().eval()
    if head_type == "ca":
        head.fused_attn = True
    src, qry = torch.randn(2, N, d, dtype=torch.double), torch.randn(2, M, d, dtype=torch.double)
    a = head.attention_map(src, qry)
    out = head(src, qry)
    if head_type == "tl":
        assert a.shape == (2, 1, M, N + M)
        expected = a[:, 0] @ torch.cat([src, qry], 1)
    elif head_type == "la":
        assert a.shape == (2, 1, M, N)
        expected = a[:, 0] @ src
    else:
        assert a.shape == (2, h, M, N)
        v = head.v_norm(head.v(src)).view(2, N, h, -1).transpose(1, 2)
        expected = head.proj((a @ v).transpose(1, 2).reshape(2, M, d))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if head_type in ("tl", "la", "ca"):  # row-stochastic maps
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def test_attention_maps_helper_and_memory_diagnostics():
    m = nonzero_heads(small_model())
    x = torch.randn(2, 3, 28, 28)
    maps = X.attention_maps(m, x)
    assert maps["memory_grid"] == (7, 7) and maps["process_grid"] == (4, 4)
    assert sorted(maps["read"]) == [0, 1]
    assert maps["read"][1].shape == (2, 4, 16, 49) and maps["write"][0].shape == (2, 4, 49, 16)
    # the maps are the ones that produce the layer's reads
    rec = m.trace(x)
    head = m.read_head[1]
    mem_in = m.read_norm[1](rec["memory"][0])
    v = head.v(mem_in).view(2, 49, 4, 8).transpose(1, 2)
    torch.testing.assert_close((maps["read"][1] @ v).transpose(1, 2).reshape(2, 16, 32), rec["read"][1],
                               rtol=1e-4, atol=1e-5)
    assert sorted(X.attention_maps(m, x, layers=[-1])["write"]) == [1]
    with pytest.raises(ValueError, match="out of range"):
        X.attention_maps(m, x, layers=[5])
    df = X.memory_diagnostics(m, x)
    assert list(df.layer) == [0, 1]
    assert {"write_norm", "read_norm", "write_rel_norm", "memory_norm", "cos_to_initial", "cos_to_previous"} <= set(df)
    assert (df.write_norm > 0).all() and df.cos_to_initial.between(-1, 1).all()
    expected = F.cosine_similarity(rec["memory"][1], rec["memory0"], dim=-1).mean().item()
    assert df.cos_to_initial[1] == pytest.approx(expected, rel=1e-5)
    # layer 0's write norm is the mean token norm of the write head's output
    assert df.write_norm[0] == pytest.approx(rec["write"][0].norm(dim=-1).mean().item(), rel=1e-5)


def test_ablation_configs_build():
    studies = X.ablation_configs()
    assert set(studies) == {"head_fusion", "latent_scale", "patch_sizes", "memory_blocks"}
    assert len(studies["head_fusion"]) == 15
    assert [v["latent_size_scale"] for v in studies["latent_scale"].values()] == [1, 2, 4]
    assert list(studies["patch_sizes"]) == ["m2p2", "m2p4", "m2p7", "m4p4", "m4p7", "m7p7"]
    assert set(X.ablation_configs("patch_sizes", img_size=32)) == {"m2p2", "m2p4", "m2p8", "m4p4", "m4p8", "m8p8"}
    x = torch.randn(1, 3, 28, 28)
    for study in ("head_fusion", "latent_scale", "memory_blocks"):
        for label, kw in studies[study].items():
            m = meta_model("vittm_cpu_m4p4_28", **kw)
            assert all(getattr(m, {"memory_blocks": "memory_blocks_type"}.get(k, k)) == v for k, v in kw.items()), label
    for label, kw in studies["patch_sizes"].items():
        m = timm.create_model("vittm_cpu_m4p4_28", depth=1, **kw)
        assert m(x)[0].shape == (1, 10), label
    with pytest.raises(ValueError, match="unknown ablation study"):
        X.ablation_configs("nope")


# ----------------------------------------------------------------------------------------------------------------------
# parameter counts and MACs (the pinned numbers)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,total,used_official_total", [
    ("vittm_small_m28p28_224", 29_262_800, 33_182_288),
    ("vittm_base_m28p28_224", 111_607_760, 126_524_624),
    ("vittm_small_m16p32_224", 28_975_952, 32_600_144),
    ("vittm_base_m16p32_224", 111_034_064, 125_360_336),
])
def test_used_param_counts_equal_official(name, total, used_official_total):
    m = shared_meta_model(name)
    assert sum(p.numel() for p in m.parameters()) == total
    assert count_used_params(m, torch.empty(1, 3, 224, 224, device="meta")) == total
    # official total = ours + the never-used tensors (cls_token, pos_embed, 16x16 patch_embed unless it is the memory
    # embedder, 24 lin proj layers)
    d = m.embed_dim
    unused = d + 197 * d + 24 * (d * d + d) + (0 if m.memory_ps == 16 else 3 * 16 * 16 * d + d)
    assert total + unused == used_official_total


def test_param_count_10450_classes():
    assert sum(p.numel() for p in meta_model("vittm_small_m28p28_224", num_classes=10450).parameters()) + (
        384 + 197 * 384 + 295_296 + 3_548_160) == 40_458_788
    assert sum(p.numel() for p in meta_model("vittm_base_m28p28_224", num_classes=10450).parameters()) + (
        14_916_864) == 141_058_724


def expected_macs(d, depth, heads, latent, n_mem, n_proc, mem_ps, proc_ps, classes=1000, mlp_ratio=4):
    """MACs that FlopCounterMode counts for a lin/residual ViTTM (matmuls, convs, einsums; not norms/activations)."""
    embed = n_mem * d * 3 * mem_ps ** 2 + n_proc * d * 3 * proc_ps ** 2
    block = n_proc * (4 * d * d + 2 * mlp_ratio * d * d) + 2 * n_proc * n_proc * d

    def lin(n_src, n_qry):  # q, k, v projections + phi(K)^T V + normalizer + phi(Q)(KV)
        return n_qry * d * latent + n_src * d * latent + n_src * d * d + n_src * latent * d // heads \
            + n_qry * latent + n_qry * latent * d // heads
    return embed + depth * (block + lin(n_mem, n_proc) + lin(n_proc, n_mem)) + 2 * d * classes


def layernorm_elements(d, depth, n_mem, n_proc):
    """Elements normalized by LayerNorms in one forward (read/write norms on both streams, two per block, final)."""
    return depth * (2 * n_mem + 4 * n_proc) * d + n_proc * d + 2 * d


@pytest.mark.parametrize("name,args,fvcore_explicit,fvcore_fused", [
    ("vittm_small_m28p28_224", (384, 12, 6, 96, 64, 64, 28, 28), 1.881, 1.843),
    ("vittm_base_m28p28_224", (768, 12, 12, 192, 64, 64, 28, 28), 7.159, 7.084),
    ("vittm_small_m16p32_224", (384, 12, 6, 96, 196, 49, 16, 32), 1.879, 1.857),
    ("vittm_base_m16p32_224", (768, 12, 12, 192, 196, 49, 16, 32), 7.140, 7.096),
])
def test_macs_exact_and_equal_to_official_fvcore(name, args, fvcore_explicit, fvcore_fused):
    m = shared_meta_model(name)
    with all_heads(m):  # the official forward (and its fvcore count) computes both heads
        macs = count_macs(m, input_size=(3, 224, 224))["macs"]
    assert macs == expected_macs(*args)
    # eval() computes only the memory head: one classifier (d x classes) less; the restored switch is off again
    assert not m.return_all_heads
    assert count_macs(m, input_size=(3, 224, 224))["macs"] == macs - args[0] * 1000
    # The reference's fvcore numbers also count LayerNorms (5 per element with affine), which FlopCounterMode does not;
    # adding them reproduces the official numbers to the 3 decimals the reference gives, with attention counted
    # (TIMM_FUSED_ATTN=0) and without the block attention matmuls (fvcore's default: fused attention not counted).
    d, depth, _, _, n_mem, n_proc = args[:6]
    fvcore_like = macs + 5 * layernorm_elements(d, depth, n_mem, n_proc)
    assert abs(fvcore_like / 1e9 - fvcore_explicit) < 5e-4
    assert abs((fvcore_like - depth * 2 * n_proc * n_proc * d) / 1e9 - fvcore_fused) < 5e-4


def test_macs_ratio_vs_vit_b():
    vitb = count_macs(meta_model("vit_base_patch16_224"), input_size=(3, 224, 224))["gmacs"]
    with all_heads(shared_meta_model("vittm_base_m28p28_224")) as m:
        vittm_b = count_macs(m, input_size=(3, 224, 224))["gmacs"]
    assert vittm_b == pytest.approx(7.141060608, abs=1e-9)
    # reference: 17.583 / 7.159 = 2.46x with attention counted (abstract: "2.4x fewer FLOPs")
    assert vitb / vittm_b == pytest.approx(2.46, abs=0.01)


# ----------------------------------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [lambda s: s, compiled, ema], ids=["raw", "orig_mod", "ema"])
@pytest.mark.parametrize("name,d,latent", [("vittm_small_m28p28_224", 384, 96), ("vittm_base_m28p28_224", 768, 192)])
def test_filter_accepts_official_full_size_state_dicts(wrap, name, d, latent):
    sd = official_state_dict(d, 12, latent, 64, 64, 28, 28, device="meta")
    assert len(sd) == 404  # the reference's tensor count
    m = shared_meta_model(name)
    out = V.checkpoint_filter_fn(wrap(sd), m)
    assert set(out) == set(m.state_dict())
    assert len(out) == 404 - 2 - 2 - 48
    m.load_state_dict(out, strict=True)


def test_filter_16_32_patch_embed_is_memory_embedder():
    sd = official_state_dict(384, 12, 96, 196, 49, 16, 32, device="meta")
    m = shared_meta_model("vittm_small_m16p32_224")
    assert set(V.checkpoint_filter_fn(sd, m)) == set(m.state_dict())
    del sd["memory_embedder.proj.weight"], sd["memory_embedder.proj.bias"]  # only the shared patch_embed copy
    out = V.checkpoint_filter_fn(sd, m)
    assert set(out) == set(m.state_dict()) and out["memory_embedder.proj.weight"] is sd["patch_embed.proj.weight"]


@pytest.mark.parametrize("wrap", [lambda s: s, compiled, ema], ids=["raw", "orig_mod", "ema"])
def test_official_weights_give_official_outputs(wrap):
    """Load an official-format state dict and compare with an independent functional forward of the reference math."""
    cfg = dict(img_size=28, memory_ps=4, process_ps=7, embed_dim=32, depth=2, num_heads=4, num_classes=5,
               latent_size_scale=4)
    sd = official_state_dict(32, 2, 8, 49, 16, 4, 7, num_classes=5)
    m = V.ViTTM(**cfg).eval()
    V.load_official_checkpoint(m, wrap(sd))
    m.set_all_heads(True)  # eval() returns only the memory head unless asked for both
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ours = m(x)
        ref = reference_forward(sd, x, 4, 7, heads=4, depth=2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ours[0].abs().sum() > 0 and not torch.allclose(ours[0], ours[1])


def test_timm_create_model_pretrained_from_local_file(tmp_path):
    sd = official_state_dict(128, 2, 32, 49, 49, 4, 4, num_classes=10)
    path = tmp_path / "best_ema.pth"
    torch.save(ema(sd), path)
    m = timm.create_model("vittm_cpu_m4p4_28", pretrained=True, depth=2, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m.read_head[1].k.weight, sd["read_head.1.k.weight"])
    torch.testing.assert_close(m.head.weight, sd["head.weight"])
    # another class count: timm re-initializes both heads, everything else still loads
    m2 = timm.create_model("vittm_cpu_m4p4_28", pretrained=True, num_classes=3, depth=2,
                           pretrained_cfg_overlay=dict(file=str(path)))
    assert m2.head.weight.shape == (3, 128) and torch.count_nonzero(m2.process_head.weight) == 0
    torch.testing.assert_close(m2.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    # other image size: position tables are resampled (7x7 -> 8x8), the rest loads unchanged
    m3 = timm.create_model("vittm_cpu_m4p4_28", pretrained=True, img_size=32, depth=2,
                           pretrained_cfg_overlay=dict(file=str(path)))
    expected = timm.layers.resample_abs_pos_embed(sd["memory_pos_embed"], (8, 8), (7, 7), num_prefix_tokens=0)
    torch.testing.assert_close(m3.memory_pos_embed.data, expected)
    assert m3(torch.randn(1, 3, 32, 32))[0].shape == (1, 10)


@pytest.mark.parametrize("mem_blocks", ["none", "mlp"])
@pytest.mark.parametrize("fusion", V.FUSION_TYPES)
@pytest.mark.parametrize("rw", V.RW_HEAD_TYPES)
def test_every_option_loads_from_official_format_strictly(rw, fusion, mem_blocks, tmp_path):
    """Each head x fusion x memory-block option: our weights under the official names and shapes (with the official
    unused tensors, EMA-wrapped) load strictly through timm's pretrained path and give the same outputs."""
    kw = dict(embed_dim=32, depth=2, num_heads=4, latent_size_scale=2, rw_head_type=rw, fusion_type=fusion,
              memory_blocks=mem_blocks, num_classes=10, img_size=28, memory_ps=4, process_ps=7)
    torch.manual_seed(0)
    src = nonzero_heads(timm.create_model("vittm_cpu_m4p4_28", **kw)).eval()
    with torch.no_grad():  # non-trivial norms, gates and memory blocks
        for n, p in src.named_parameters():
            if "norm" in n or "fusion" in n or "mem_blocks" in n:
                p.add_(0.1 * torch.randn_like(p))
    shapes = official_option_shapes(32, 2, 4, 16, 49, 16, rw, fusion, mem_blocks)
    sd = official_format(src, shapes)
    path = tmp_path / "best_ema.pth"
    torch.save(ema(sd), path)
    dst = timm.create_model("vittm_cpu_m4p4_28", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            **kw).eval()
    x = torch.randn(2, 3, 28, 28)
    src.set_all_heads(True)
    dst.set_all_heads(True)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # strict: a missing official tensor is an error naming it
    key = shapes[0][0]
    del sd[key]
    with pytest.raises(ValueError, match=re.escape(f"missing keys: {key}")):
        V.checkpoint_filter_fn(sd, dst)


def test_official_names_of_la_and_memory_blocks():
    la = V.LatentAttentionHead(32, latent_size_scale=2)
    assert sorted({k.split(".")[0] for k in la.state_dict()}) == ["mlp", "mlp2", "norm", "norm_q"]
    m = small_model(memory_blocks="mlp")
    assert any(k.startswith("mem_blocks.0.mlp.fc1") for k in m.state_dict())
    assert not any(k.startswith("memory_blocks") for k in m.state_dict())
    assert m.mem_blocks[0].norm.eps == 1e-5  # official nn.LayerNorm default, not the blocks' 1e-6
    # la: norm/mlp act on the source tokens, norm_q/mlp2 on the queries (official forward)
    torch.manual_seed(0)
    src, qry = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        a = la.mlp2(la.norm_q(qry)).softmax(-1)
        b = la.mlp(la.norm(src)).transpose(1, 2).softmax(-1)
        torch.testing.assert_close(la(src, qry), a @ (b @ src))


def test_pos_drop_applies_to_both_streams():
    """Official ``_pos_embed`` ends with ``pos_drop`` and is called for the memory and the process stream."""
    x = torch.randn(2, 3, 28, 28)
    m = small_model(pos_drop_rate=0.5)
    mem, proc = m.embed(x)
    assert (mem == 0).float().mean() > 0.3 and (proc == 0).float().mean() > 0.3
    m.eval()
    mem, proc = m.embed(x)
    assert (mem == 0).float().mean() < 0.01


def test_memory_mlp_block_drops_with_proj_drop_rate():
    """Official ``MemMlpBlock(embed_dim, hidden, drop=proj_drop_rate)``: timm Mlp dropout after both layers."""
    m = small_model(memory_blocks="mlp", proj_drop_rate=0.25)
    blk = m.mem_blocks[0]
    assert blk.mlp.drop1.p == blk.mlp.drop2.p == 0.25
    t = torch.randn(2, 49, 32)
    assert not torch.equal(blk(t), blk(t))
    blk.eval()
    assert torch.equal(blk(t), blk(t))


def test_tl_head_mlp_drops_with_drop_rate():
    """Official ``TokenLearner(..., drop=drop_rate)``; the official la heads get no dropout (ca/lca/lin have none)."""
    m = small_model(rw_head_type="tl", drop_rate=0.1)
    assert m.read_head[0].mlp.drop1.p == m.write_head[1].mlp.drop2.p == 0.1
    la = small_model(rw_head_type="la", drop_rate=0.1)
    assert la.read_head[0].mlp.drop1.p == la.read_head[0].mlp2.drop2.p == 0.0


def test_grad_checkpointing_matches():
    m = nonzero_heads(small_model())
    x = torch.randn(2, 3, 28, 28)
    ref = m(x)
    g_ref = torch.autograd.grad(sum(o.sum() for o in ref), m.memory_embedder.proj.weight)[0]
    m.set_grad_checkpointing(True)
    out = m(x)
    g = torch.autograd.grad(sum(o.sum() for o in out), m.memory_embedder.proj.weight)[0]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g, g_ref)


def test_forward_intermediates_process_tokens_after_each_layer():
    m = nonzero_heads(small_model(depth=3)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = m.forward_intermediates(x, intermediates_only=True)
        assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 3  # NCHW on the 4x4 process grid
        # the process stream after each layer, step by step
        mem, proc = m.embed(x)
        for i in range(3):
            mem, proc = m._layer(i, mem, proc)
            torch.testing.assert_close(feats[i], proc.reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
        final, inter = m.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC")
        torch.testing.assert_close(final, m.forward_features(x))  # the eval head's tokens (memory)
        m.set_all_heads(True)
        feats_all = m.forward_features(x)
        m.set_all_heads(False)
        torch.testing.assert_close(inter[0], feats_all[1])  # normalized last process tokens
        assert len(m.forward_intermediates(x, indices=2, intermediates_only=True)) == 2  # the last two
        early = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], feats[0])
        memf = m.forward_intermediates(x, indices=[1], stream="memory", intermediates_only=True)
        assert memf[0].shape == (2, 32, 7, 7)
    with pytest.raises(ValueError, match="equal memory and process grids"):
        m.forward_intermediates(x, stream="both")
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")
    eq = small_model(process_ps=4)
    both = eq.forward_intermediates(x, indices=[0], stream="both", intermediates_only=True)
    assert both[0].shape == (2, 64, 7, 7)  # process and memory channels (official segmentation backbone, 28/28)


def test_prune_intermediate_layers():
    m = nonzero_heads(small_model(depth=3)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        kept = m.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and m.depth == 2
        assert len(m.blocks) == len(m.read_head) == len(m.write_head) == len(m.read_norm) == 2
        assert len(m.write_norm) == len(m.mem_blocks) == len(m.feature_info) == 2
        out = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b)
        assert m.num_classes == 0 and m(x).shape == (2, 32)  # classifiers and pooling norms pruned


def test_timm_features_only_and_feature_info():
    m = timm.create_model("vittm_cpu_m4p4_28", features_only=True, out_indices=(1, 3), depth=4, embed_dim=32)
    assert m.feature_info.channels() == [32, 32] and m.feature_info.reduction() == [4, 4]
    assert m.feature_info.module_name() == ["blocks.1", "blocks.3"]
    with torch.no_grad():
        feats = m(torch.randn(2, 3, 28, 28))
    assert [f.shape for f in feats] == [(2, 32, 7, 7)] * 2
    assert len(m.model.blocks) == 4  # pruned after the last wanted layer (here the last)
    full = timm.create_model("vittm_cpu_m4p4_28", depth=4, embed_dim=32)
    assert [d["module"] for d in full.feature_info] == [f"blocks.{i}" for i in range(4)]
    assert all(d["num_chs"] == 32 and d["reduction"] == 4 for d in full.feature_info)


def test_timm_model_api_group_matcher_classifier_no_weight_decay():
    from timm.models._manipulate import group_parameters

    m = small_model(depth=3, fusion_type="add_erase", memory_blocks="mlp")
    groups = group_parameters(m, m.group_matcher())
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())
    ordered = [groups[k] for k in sorted(groups)]
    assert ordered[0] == [n for n, _ in m.named_parameters() if n.startswith(("memory_embedder", "memory_pos",
                                                                               "process_embedder", "process_pos"))]
    assert len(ordered) == 5  # stem, layers 0-2, classifiers
    shared = {"read_fusion", "write_fusion", "process_norm"}  # join the last layer (timm's MATCH_PREV_GROUP)
    for i in range(3):  # one group per layer: block, read/write head and norm, memory block
        layer = [n for n in ordered[1 + i] if n.split(".")[0] not in shared]
        assert {n.split(".")[0] for n in layer} == {"blocks", "read_head", "write_head", "read_norm", "write_norm",
                                                    "mem_blocks"}
        assert all(n.split(".")[1] == str(i) for n in layer)
    assert {n.split(".")[0] for n in ordered[3]} >= shared
    assert {n.split(".")[0] for n in ordered[4]} == {"fc_norm", "head", "process_head", "fc_norm_process"}
    assert m.group_matcher(coarse=True) == m.group_matcher()
    assert m.get_classifier() == (m.head, m.process_head)
    assert {"memory_pos_embed", "process_pos_embed"} <= m.no_weight_decay()
    m.reset_classifier(3)
    assert m.head.weight.shape == m.process_head.weight.shape == (3, 32) and m.num_classes == 3
    assert torch.count_nonzero(m.head.weight) == 0  # official zero init
    m.reset_classifier(0)
    assert isinstance(m.head, torch.nn.Identity) and m.eval()(torch.randn(1, 3, 28, 28)).shape == (1, 32)


def test_position_tables_resample_at_runtime():
    m = small_model()
    out = m.forward_features(torch.randn(1, 3, 56, 56))
    assert out[0].shape == (1, 196, 32) and out[1].shape == (1, 64, 32)


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match="memory_ps=5 does not divide the image size 28x28"):
        small_model(memory_ps=5)
    with pytest.raises(ValueError, match="process_ps=6 does not divide"):
        small_model(process_ps=6)
    with pytest.raises(ValueError, match="memory_ps=4 does not divide the input size 30x30"):
        small_model()(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="unknown rw_head_type 'linear'"):
        small_model(rw_head_type="linear")
    with pytest.raises(ValueError, match="'dyna' is not supported"):
        small_model(rw_head_type="dyna")
    with pytest.raises(ValueError, match="unknown fusion_type 'add'"):
        small_model(fusion_type="add")
    with pytest.raises(ValueError, match="'conv' is not supported"):
        small_model(memory_blocks="conv")
    with pytest.raises(ValueError, match="'downsample' is not supported"):
        small_model(process_embedder_type="downsample")
    with pytest.raises(ValueError, match="unknown process_embedder_type"):
        small_model(process_embedder_type="pixels")
    with pytest.raises(ValueError, match="latent_size_scale=3 must be a positive divisor"):
        small_model(latent_size_scale=3)
    with pytest.raises(ValueError, match=r"c = 384/128 = 3 does not split across 6 heads"):
        meta_model("vittm_small_m28p28_224", latent_size_scale=128)
    with pytest.raises(ValueError, match="does not split across"):
        small_model(rw_head_type="lca", latent_size_scale=16)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\]"):
        small_model()(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="add_erase fusion was built for 16 tokens"):
        small_model(fusion_type="add_erase")(torch.randn(1, 3, 56, 56))


def test_checkpoint_of_another_size_is_a_clear_error():
    sd = official_state_dict(384, 12, 96, 64, 64, 28, 28, device="meta")
    with pytest.raises(ValueError, match=r"shape mismatches: .*blocks\.0\.norm1\.weight: checkpoint \(384,\) vs model "
                                         r"\(768,\).*Build the model with the checkpoint's configuration"):
        V.checkpoint_filter_fn(sd, shared_meta_model("vittm_base_m28p28_224"))
    # a 6-layer checkpoint into a 12-layer model: missing keys are listed
    sd6 = official_state_dict(384, 6, 96, 64, 64, 28, 28, device="meta")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.6\.norm1\.weight"):
        V.checkpoint_filter_fn(sd6, shared_meta_model("vittm_small_m28p28_224"))
    # another head type: unexpected keys are listed
    with pytest.raises(ValueError,
                       match=r"missing keys: read_head\.0\.norm\.weight.*unexpected keys: write_head\.0\.q\.weight"):
        V.checkpoint_filter_fn(sd, meta_model("vittm_small_m28p28_224", rw_head_type="tl"))
    # another class count without asking for head adaptation
    sd_cls = official_state_dict(384, 12, 96, 64, 64, 28, 28, num_classes=10450, device="meta")
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(10450, 384\) vs model \(1000, 384\)"):
        V.checkpoint_filter_fn(sd_cls, shared_meta_model("vittm_small_m28p28_224"))
    out = V.checkpoint_filter_fn(sd_cls, shared_meta_model("vittm_small_m28p28_224"), allow_head_mismatch=True)
    assert "head.weight" not in out and "blocks.0.attn.qkv.weight" in out


# ----------------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------------
def test_reference_file_validates():
    refs = references.load("vittm")
    by = {(r.model, r.metric): r for r in refs}
    assert by[("ViTTM-B", "top1")].value == 82.9 and by[("ViTTM-B", "top1")].kind == "paper"
    assert by[("ViTTM-B", "latency_ms")].value == 234.1 and by[("ViT-B", "latency_ms")].value == 529.5
    assert by[("ViTTM-S", "params_used")].value == 29_262_800
    assert by[("ViTTM-B", "params_used")].value == 111_607_760
    # our counted MACs pass the official-code reference for the attention-counted GMACs
    assert by[("ViTTM-B", "gmacs")].passes(7.141060608)
    assert all(r.kind in references.SOURCE_KINDS for r in refs)
