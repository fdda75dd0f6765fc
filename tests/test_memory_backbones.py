"""MemoryViT on token-sequence backbones (tokenbook's T2T-ViT): exactness, concatenation, fine-tuning modes,
refused backbones and parameter counts. Tiny random T2T-ViTs at 28 px, 1 channel (the timm-ViT path: test_memory)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenbook.models  # noqa: F401  (registers t2t_vit_* and vittm_*)
from tokenbook.experiments.memory import class_token_patch_attention, memory_attention
from tokenbook.methods.memory_finetune import finetune_model, set_trainable
from tokenbook.models.memory import (
    SOURCE, MemoryViT, concatenate, create_memory_vit, memory_task_params, naive_concatenate, record_attention,
    task_parameter_count,
)

DEPTH, DIM, HEADS, GRID = 4, 64, 4, 7
T2T_NAMES = {"performer": "t2t_vit_tiny_fmnist", "transformer": "t2t_vit_t_tiny_fmnist"}
T2T_KW = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)


def tiny_t2t(tokens: str = "performer", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(T2T_NAMES[tokens], **{**T2T_KW, **kw}).eval()


def randomize_task(model: MemoryViT, name: str, seed: int) -> None:
    """Non-trivial task values (as after training): zero heads would hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def task_model(bb, name, cells, seed, classes=5, **kw) -> MemoryViT:
    m = MemoryViT(bb, **kw).eval()
    m.add_task(name, classes, cells=cells)
    randomize_task(m, name, seed)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["performer", "transformer"])
def backbone(request):
    return tiny_t2t(request.param)


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], HEADS, DIM // HEADS).transpose(1, 2)


def _reference_task_logits(bb, task, images):
    """Hand-written forward of one task token on the T2T-ViT (Table 1, concatenation, memory through norm1): the
    joint sequence [original tokens, task token] with the original rows masked from the task token and the task row
    reading original tokens, itself and its memory; read-out = the final-normed task token, then the task head."""
    x = bb.forward_tokens(images)
    L0 = x.shape[1]
    x = torch.cat([x, (task.class_token + bb.pos_embed[:, :1]).expand(x.shape[0], -1, -1)], dim=1)
    m = task.cells
    mask = torch.ones(L0 + 1, L0 + 1 + m, dtype=torch.bool)
    mask[:L0, L0:] = False
    for i, blk in enumerate(bb.blocks):
        a = blk.attn
        h = blk.norm1(x)
        kv_in = torch.cat([h, blk.norm1(task.memory[i]).expand(x.shape[0], -1, -1)], dim=1)
        w_q, w_k, w_v = a.qkv.weight.chunk(3)
        q, k, v = _heads(h @ w_q.T), _heads(kv_in @ w_k.T), _heads(kv_in @ w_v.T)
        att = (q @ k.transpose(-2, -1) * a.scale).masked_fill(~mask, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(x.shape[0], L0 + 1, DIM)
        x = x + a.proj(o)
        x = x + blk.mlp(blk.norm2(x))
    return task.head(bb.norm(x)[:, -1]), bb.head(bb.norm(x)[:, 0])


# ----------------------------------------------------------------------------------------------------------
# 1. Source head bit-identical; a task computes what the paper says
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("memory_norm", ["pre", "post"])
def test_source_head_bit_identical(backbone, images, memory_norm, global_pool):
    bb = backbone if global_pool == "token" else tiny_t2t(global_pool="avg")
    with torch.no_grad():
        ref = bb(images)
        m = MemoryViT(bb, memory_norm=memory_norm).eval()
        assert m.backbone_kind == "token-sequence backbone"
        assert torch.equal(m(images)[0], ref)  # no tasks
        m.add_task("a", 5, cells=3)
        m.add_task("b", 4, cells=1, extend=True)
        m.add_task("c", 7, cells=0)  # head + class token
        m.add_task("d", 3, class_token=False)  # head on the original pooled features
        for n in "abcd":
            randomize_task(m, n, seed=ord(n))
        exact = m.forward_all(images)
        assert list(exact) == [SOURCE, "a", "b", "c", "d"]
        assert [o.shape[1] for o in exact.values()] == [10, 5, 4, 7, 3]
        assert torch.equal(exact[SOURCE], ref)
        assert torch.equal(exact["d"], m.tasks["d"].head(bb.forward_head(bb.forward_features(images), True)))
        for impl in ("split", "joint"):
            m.impl = impl
            other = m.forward_all(images)
            for n in exact:
                torch.testing.assert_close(other[n], exact[n], rtol=1e-4, atol=1e-4)
            if impl == "split":
                assert torch.equal(other[SOURCE], ref)


@pytest.mark.parametrize("impl", ["exact", "split", "joint"])
def test_task_matches_hand_written_reference(backbone, images, impl):
    """Position row, memory placement, mask and read-out: against an independent forward (fails e.g. without the
    class token's position embedding on the task token or with the memory after norm1)."""
    m = task_model(backbone, "a", cells=2, seed=3, impl=impl)
    with torch.no_grad():
        want_task, want_source = _reference_task_logits(backbone, m.tasks["a"], images)
        got = m.forward_all(images)
    torch.testing.assert_close(got["a"], want_task, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[SOURCE], want_source, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the position row matters: the reference without it is far off
        pe = backbone.pos_embed.clone()
        backbone.pos_embed[:, :1] = 0
        try:
            off, _ = _reference_task_logits(backbone, m.tasks["a"], images)
        finally:
            backbone.pos_embed.copy_(pe)
    assert (off - want_task).abs().max() > 1e-2


def test_dynamic_img_size_and_create_memory_vit():
    m = create_memory_vit("t2t_vit_tiny_fmnist", **{**T2T_KW, "depth": 2}, dynamic_img_size=True,
                          pos_embed_mode="regenerate").eval()
    m.add_task("a", 3, cells=2)
    randomize_task(m, "a", 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = m.forward_all(x)
        assert torch.equal(out[SOURCE], m.backbone(x))
        m.impl = "joint"
        torch.testing.assert_close(m.forward_all(x)["a"], out["a"], rtol=1e-4, atol=1e-4)
    assert m.attention_mask().shape == (GRID * GRID + 1 + 1, GRID * GRID + 1 + 1 + 2)  # built size: 49 + cls


# ----------------------------------------------------------------------------------------------------------
# 2. Exact under concatenation; extension semantics
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["exact", "split", "joint"])
def test_concatenation_equals_stand_alone(backbone, images, impl):
    ma = task_model(backbone, "a", cells=3, seed=11, classes=5, impl=impl)
    mb = task_model(backbone, "b", cells=2, seed=12, classes=4, impl=impl)
    merged = concatenate([ma, mb])
    with torch.no_grad():
        alone = {"a": ma.forward_all(images)["a"], "b": mb.forward_all(images)["b"]}
        out = merged.forward_all(images)
        ref = backbone(images)
    assert list(out) == [SOURCE, "a", "b"]
    for n in "ab":
        if impl == "exact":
            assert torch.equal(out[n], alone[n]), n
        else:
            torch.testing.assert_close(out[n], alone[n], rtol=1e-5, atol=1e-5)
    if impl != "joint":
        assert torch.equal(out[SOURCE], ref)
    with torch.no_grad():  # without the mask the tasks (and the source head) interfere
        naive = naive_concatenate([ma, mb]).forward_all(images)
    assert (naive["b"] - alone["b"]).abs().max() > 1e-3
    assert (naive[SOURCE] - ref).abs().max() > 1e-4


def test_extension_reads_earlier_task(backbone, images):
    ma = task_model(backbone, "a", cells=3, seed=11)
    mb = task_model(backbone, "b", cells=2, seed=12)
    ext = MemoryViT(backbone).eval()
    ext.load_task("a", ma.task_state_dict("a"))
    ext.load_task("b", mb.task_state_dict("b"), reads=["a"])
    merged = concatenate([ma, mb])
    with torch.no_grad():
        e, c = ext.forward_all(images), merged.forward_all(images)
        assert torch.equal(e[SOURCE], c[SOURCE]) and torch.equal(e["a"], c["a"])
        assert (e["b"] - c["b"]).abs().max() > 1e-3  # b reads a's class token and memory
        ext.tasks["a"].memory.mul_(-1)
        merged.tasks["a"].memory.mul_(-1)
        e2, c2 = ext.forward_all(images), merged.forward_all(images)
    assert (e2["b"] - e["b"]).abs().max() > 1e-4  # extension: a's memory changes b
    assert torch.equal(c2["b"], c["b"])  # concatenation: it does not
    assert torch.equal(e2[SOURCE], e[SOURCE])


# ----------------------------------------------------------------------------------------------------------
# 3. Fine-tuning modes: the right parameters train, the source head is untouched
# ----------------------------------------------------------------------------------------------------------
def test_memory_mode_trains_only_task_parts_and_is_non_destructive(images):
    bb = tiny_t2t()
    m = MemoryViT(bb).eval()
    m.add_task("a", 5, cells=2)
    m.add_task("t", 3, cells=2)
    randomize_task(m, "a", 1)
    m.tasks["t"].head.weight.data.normal_()  # non-zero head: gradients reach memory and class token
    names = set_trainable(m, "memory", "t")
    assert set(names) == {"tasks.t.class_token", "tasks.t.memory", "tasks.t.head.weight", "tasks.t.head.bias"}
    with torch.no_grad():
        before = m.forward_all(images)
    loss = F.cross_entropy(m.forward_all(images)["t"], torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for n, p in m.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    with torch.no_grad():
        after = m.forward_all(images)
        assert torch.equal(after[SOURCE], before[SOURCE]) and torch.equal(after[SOURCE], bb(images))
        assert torch.equal(after["a"], before["a"])
    assert (after["t"] - before["t"]).abs().max() > 1e-4


def test_other_modes_and_finetune_model(images):
    bb = tiny_t2t()
    ref = bb(images).detach()
    m = MemoryViT(bb)
    m.add_task("t", 3, cells=1)
    assert set(set_trainable(m, "head", "t")) == {"tasks.t.head.weight", "tasks.t.head.bias"}
    assert set(set_trainable(m, "head+cls", "t")) == {"tasks.t.class_token", "tasks.t.head.weight",
                                                       "tasks.t.head.bias"}
    full = finetune_model(bb, "full", 3)
    names = [n for n, p in full.named_parameters() if p.requires_grad]
    assert "backbone.blocks.0.attn.qkv.weight" in names and "backbone.cls_token" in names
    assert not any(n.startswith("backbone.head.") for n in names)
    F.cross_entropy(full(images), torch.tensor([0, 1, 2, 0])).backward()
    torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.5).step()
    assert full.backbone is not bb
    assert torch.equal(bb(images), ref)  # the shared backbone was copied, not trained
    mem = finetune_model(bb, "memory", 3, cells=2)
    assert mem(images).shape == (4, 3) and mem.backbone is bb


# ----------------------------------------------------------------------------------------------------------
# 4. Refused backbones
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, match", [
    ("se", r"SEAttention.*only timm's pre-norm Block with timm\.layers\.Attention"),
    ("ghost", r"GhostAttention.*only timm's pre-norm Block"),
    ("dense", r"DenseBlock.*only timm's pre-norm Block"),
    ("vittm", r"ViTTM is not supported.*no class token.*process stream"),
    ("module", r"needs a timm VisionTransformer.*or a token-sequence backbone.*T2TViT.*lacks forward_tokens"),
    ("norm_pre", r"norm_pre is LayerNorm"),
    ("pool", r"global_pool='' .*supports 'token'"),
])
def test_unsupported_backbones(kind, match):
    if kind in ("se", "ghost"):
        bb = tiny_t2t(block_type=kind, mlp_ratio=3.0)  # ghost MLPs need ratio 3
    elif kind == "dense":
        bb = timm.create_model("t2t_vit_dense", device="meta")
    elif kind == "vittm":
        bb = timm.create_model("vittm_cpu_m4p4_28")
    elif kind == "module":
        bb = nn.Sequential(nn.Linear(4, 4))
    else:
        bb = tiny_t2t(depth=1)
        if kind == "norm_pre":
            bb.norm_pre = nn.LayerNorm(DIM)
        else:
            bb.global_pool = ""
    with pytest.raises(ValueError, match=match):
        MemoryViT(bb)


# ----------------------------------------------------------------------------------------------------------
# 5. Parameter counts; attention read-outs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cells, classes, token", [(1, 10, True), (4, 7, True), (0, 5, True), (0, 3, False)])
def test_parameter_counts(cells, classes, token):
    m = MemoryViT(tiny_t2t(depth=DEPTH))
    m.add_task("t", classes, cells=cells, class_token=token)
    count = task_parameter_count(m, "t")
    assert count["total"] == memory_task_params(DEPTH, DIM, cells, classes, class_token=token)
    assert count["memory"] == DEPTH * cells * DIM and count["head"] == DIM * classes + classes
    assert count["total"] == sum(p.numel() for p in m.tasks["t"].parameters())


def test_attention_read_outs(backbone, images):
    m = task_model(backbone, "a", cells=3, seed=5)
    with torch.no_grad():
        fused = m.forward_all(images)
        with record_attention(m) as rec:
            explicit = m.forward_all(images)
    assert len(rec) == DEPTH and rec[0].source.shape == (4, HEADS, GRID * GRID + 1, GRID * GRID + 1)
    assert rec[0].tasks.shape == (4, HEADS, 1, GRID * GRID + 1 + 1 + 3)
    torch.testing.assert_close(rec[0].tasks.sum(-1), torch.ones(4, HEADS, 1))
    torch.testing.assert_close(explicit["a"], fused["a"], rtol=1e-4, atol=1e-4)
    assert memory_attention(m, images)["a"].shape == (DEPTH, HEADS, 3)
    maps = class_token_patch_attention(m, images)
    assert set(maps) == {SOURCE, "a"} and maps["a"].shape == (4, HEADS, GRID, GRID)
    torch.testing.assert_close(maps[SOURCE].flatten(2), rec[-1].source[:, :, 0, 1:])
