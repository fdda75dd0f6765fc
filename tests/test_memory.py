"""Tests of tokenbook.memory (Learnable Memory, Sandler et al. 2022): exactness, masks, modes, counts, helpers."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbook import bench, references
from tokenbook.data.tasks import class_group_indices, make_task_datasets
from tokenbook.experiments.memory import class_token_patch_attention, memory_attention
from tokenbook.methods.memory_finetune import finetune_model, set_trainable
from tokenbook.models.memory import (
    FINETUNE_MODES, SOURCE, MemoryViT, build_attention_mask, concatenate, create_memory_vit, memory_task_params,
    naive_concatenate, record_attention, table1_mask, task_parameter_count,
)

IMG = 32


def tiny_vit(seed: int = 0, **kw) -> nn.Module:
    """A small random pre-norm ViT (3 layers, dim 48, 3 heads, 4x4 = 16 patches at 32 px)."""
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def randomize_task(model: MemoryViT, name: str, seed: int) -> None:
    """Give a task non-trivial values (as after training): zero heads would hide differences."""
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
    return torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------
# Exactness: source head with memory attached, merged vs stand-alone
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_norm", ["pre", "post"])
@pytest.mark.parametrize("impl", ["exact", "split"])
def test_source_head_bit_identical(images, memory_norm, impl):
    bb = tiny_vit()
    with torch.no_grad():
        ref = bb(images)
        ref1 = bb(images[:1])
        m = MemoryViT(bb, memory_norm=memory_norm, impl=impl).eval()
        assert torch.equal(m(images)[0], ref)  # no tasks yet
        m.add_task("a", 5, cells=3)
        m.add_task("b", 4, cells=1, extend=True)
        m.add_task("c", 7, cells=0)  # head + class token
        m.add_task("d", 3, class_token=False)  # head only
        for n in "abcd":
            randomize_task(m, n, seed=ord(n))
        outs = m.forward_all(images)
        assert list(outs) == [SOURCE, "a", "b", "c", "d"]
        assert torch.equal(outs[SOURCE], ref)
        assert torch.equal(m.forward_all(images[:1])[SOURCE], ref1)
        assert [o.shape[1] for o in outs.values()] == [10, 5, 4, 7, 3]



def test_forward_head_follows_timm(images):
    """timm's forward_features -> forward_head(x, pre_logits=False) split; the head returns every head's logits by
    name, and pre_logits gives the features each head reads (issue 23: forward_heads renamed)."""
    import inspect

    bb = tiny_vit()
    m = MemoryViT(bb).eval()
    m.add_task("a", 5, cells=2)
    m.add_task("d", 3, class_token=False)
    for n in "ad":
        randomize_task(m, n, seed=ord(n))
    assert list(inspect.signature(MemoryViT.forward_head).parameters) == ["self", "x", "pre_logits"]
    assert inspect.signature(MemoryViT.forward_head).parameters["pre_logits"].default is False
    assert not hasattr(m, "forward_heads")
    with torch.no_grad():
        feats = m.forward_features(images)
        logits = m.forward_head(feats)
        pre = m.forward_head(feats, pre_logits=True)
        assert list(logits) == list(pre) == [SOURCE, "a", "d"]
        for name, out in m.forward_all(images).items():
            assert torch.equal(logits[name], out), name
        assert torch.equal(bb.get_classifier()(pre[SOURCE]), logits[SOURCE])
        assert torch.equal(pre["d"], bb.forward_head(feats[0], pre_logits=True))  # no class token: pooled features
        for name in "ad":
            assert torch.equal(m.tasks[name].head(pre[name]), logits[name]), name


def test_joint_impl_matches_to_rounding(images):
    bb = tiny_vit()
    exact = MemoryViT(bb, impl="exact").eval()
    exact.add_task("a", 5, cells=2)
    exact.add_task("b", 5, cells=3, extend=True)
    randomize_task(exact, "a", 1)
    randomize_task(exact, "b", 2)
    for impl in ("split", "joint"):
        other = MemoryViT(bb, impl=impl).eval()
        other.tasks.update(exact.tasks)
        with torch.no_grad():
            a, b = exact.forward_all(images), other.forward_all(images)
        for n in a:
            torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_norm", ["pre", "post"])
def test_concatenate_equals_standalone(images, memory_norm):
    bb = tiny_vit()
    ma = task_model(bb, "a", 1, seed=1, memory_norm=memory_norm)
    mb = task_model(bb, "b", 5, seed=2, classes=3, memory_norm=memory_norm)
    mc = MemoryViT(bb, memory_norm=memory_norm).eval()
    mc.add_task("c1", 4, cells=2)
    mc.add_task("c2", 6, cells=3, extend=True)  # an extension pair survives the merge
    randomize_task(mc, "c1", 3)
    randomize_task(mc, "c2", 4)
    md = task_model(bb, "d", 0, seed=5, memory_norm=memory_norm)  # head + class token, no memory
    with torch.no_grad():
        alone = {}
        for m in (ma, mb, mc, md):
            alone.update({k: v for k, v in m.forward_all(images).items() if k != SOURCE})
        merged = concatenate([ma, mb, mc, md]).eval()
        outs = merged.forward_all(images)
        assert list(outs) == [SOURCE, "a", "b", "c1", "c2", "d"]
        assert torch.equal(outs[SOURCE], bb(images))
        for n, v in alone.items():
            assert torch.equal(outs[n], v), n  # default impl="exact": bit-identical
            torch.testing.assert_close(outs[n], v, atol=1e-6, rtol=0)  # the guarantee
        # one forward pass, tuple in task order
        assert len(merged(images)) == 6
        # donors stay usable (tasks were copied)
        assert torch.equal(ma.forward_all(images)["a"], alone["a"])
        # the split implementation (one masked fused SDPA for the task rows) meets the 1e-6 bound
        split = concatenate([ma, mb, mc, md]).eval()
        split.impl = "split"
        s = split.forward_all(images)
        assert torch.equal(s[SOURCE], outs[SOURCE])
        for n, v in alone.items():
            torch.testing.assert_close(s[n], v, atol=1e-5, rtol=1e-5)


def test_concatenate_equals_standalone_batch_one_and_eval_of_vit_with_registers():
    bb = tiny_vit(reg_tokens=2, no_embed_class=True)
    x = torch.randn(1, 3, IMG, IMG)
    ma, mb = task_model(bb, "a", 2, seed=1), task_model(bb, "b", 1, seed=2)
    with torch.no_grad():
        merged = concatenate([ma, mb]).eval().forward_all(x)
        assert torch.equal(merged[SOURCE], bb(x))
        assert torch.equal(merged["a"], ma.forward_all(x)["a"])
        assert torch.equal(merged["b"], mb.forward_all(x)["b"])


# ----------------------------------------------------------------------------------------------------------
# The method, checked against an independent hand-written computation
# ----------------------------------------------------------------------------------------------------------
def _manual_one_layer(bb, task_tok, mem, head, x, memory_norm):
    """Reference for a 1-layer ViT with one task: written from the paper, no library code reused."""
    blk = bb.blocks[0]
    B = x.shape[0]
    t = bb.patch_embed(x)
    t = torch.cat([bb.cls_token.expand(B, -1, -1), t], 1) + bb.pos_embed
    c = task_tok + bb.pos_embed[:, :1]  # the original class token's position embedding
    z = torch.cat([t, c.expand(B, -1, -1)], 1)  # queries: originals + task token
    D, H = z.shape[-1], blk.attn.num_heads
    hd = D // H
    Wq, Wk, Wv = blk.attn.qkv.weight.split(D)
    bq, bk, bv = blk.attn.qkv.bias.split(D)
    h = blk.norm1(z)
    hm = blk.norm1(mem) if memory_norm == "pre" else mem
    kv_in = torch.cat([h, hm.expand(B, -1, -1)], 1)
    q = (h @ Wq.T + bq).view(B, -1, H, hd).transpose(1, 2)
    k = (kv_in @ Wk.T + bk).view(B, -1, H, hd).transpose(1, 2)
    v = (kv_in @ Wv.T + bv).view(B, -1, H, hd).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    L0 = t.shape[1]
    allowed = torch.zeros(L0 + 1, L0 + 1 + mem.shape[0], dtype=torch.bool)
    allowed[:, :L0] = True  # everybody sees the original tokens
    allowed[L0, L0:] = True  # the task token sees itself and its memory
    s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    a = (s @ v).transpose(1, 2).reshape(B, -1, D)
    z = z + blk.attn.proj(a)  # only the input tokens go through the residual and the MLP
    z = z + blk.mlp(blk.norm2(z))
    z = bb.norm(z)
    return bb.head(z[:, 0]), head(z[:, L0])


@pytest.mark.parametrize("memory_norm", ["pre", "post"])
def test_matches_hand_written_reference(images, memory_norm):
    bb = tiny_vit(depth=1)
    m = MemoryViT(bb, memory_norm=memory_norm, impl="exact").eval()
    task = m.add_task("a", 5, cells=4)
    randomize_task(m, "a", 7)
    with torch.no_grad():
        src, tsk = _manual_one_layer(bb, task.class_token, task.memory[0], task.head, images, memory_norm)
        outs = m.forward_all(images)
    torch.testing.assert_close(outs[SOURCE], src, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["a"], tsk, atol=1e-5, rtol=1e-5)


def test_memory_norm_placements_differ_and_memory_is_not_propagated(images):
    bb = tiny_vit()
    pre = task_model(bb, "a", 3, seed=1, memory_norm="pre")
    post = MemoryViT(bb, memory_norm="post").eval()
    post.tasks.update(pre.tasks)
    with torch.no_grad():
        a, b = pre.forward_all(images)["a"], post.forward_all(images)["a"]
        assert (a - b).abs().max() > 1e-3
        x_o, x_t = pre.forward_features(images)
    # outputs are cut back to the input tokens: originals + one task token, no memory rows
    assert x_o.shape == (6, 17, 48) and x_t.shape == (6, 1, 48)


def test_memory_init_and_token_position_embedding():
    bb = timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=12, num_classes=10)
    m = MemoryViT(bb)
    torch.manual_seed(0)
    t = m.add_task("a", 5, cells=50)
    assert t.memory.shape == (12, 50, 192)
    assert abs(t.memory.mean().item()) < 1e-3
    assert abs(t.memory.std().item() - 0.02) < 0.02 * 0.03
    assert torch.equal(t.class_token, bb.cls_token)  # token_init="auto" copies the original class token
    assert torch.count_nonzero(t.head.weight) == 0 and torch.count_nonzero(t.head.bias) == 0
    t2 = m.add_task("b", 5, token_init="normal", token_std=1.0, head_init="default")
    assert abs(t2.class_token.std().item() - 1.0) < 0.3 and torch.count_nonzero(t2.head.weight) > 0
    tokens = m._task_tokens(2)
    assert torch.equal(tokens[0, 0], t.class_token[0, 0] + bb.pos_embed[0, 0])


# ----------------------------------------------------------------------------------------------------------
# Masks: Table 1, extension vs concatenation, naive merges
# ----------------------------------------------------------------------------------------------------------
def test_table1_mask_values():
    N = 3  # original tokens
    conc = table1_mask(N, [1, 2, 1], "concatenation")
    ext = table1_mask(N, [1, 2, 1], "extension")
    assert conc.shape == ext.shape == (N + 3, N + 3 + 4)
    o = [1, 1, 1]
    #            INP/CLS  C1 C2 C3  M1 M2 M2 M3
    expect_c = [o + [0, 0, 0, 0, 0, 0, 0]] * N + [
        o + [1, 0, 0, 1, 0, 0, 0],
        o + [0, 1, 0, 0, 1, 1, 0],
        o + [0, 0, 1, 0, 0, 0, 1],
    ]
    expect_e = [o + [0, 0, 0, 0, 0, 0, 0]] * N + [
        o + [1, 0, 0, 1, 0, 0, 0],
        o + [1, 1, 0, 1, 1, 1, 0],
        o + [1, 1, 1, 1, 1, 1, 1],
    ]
    assert conc.int().tolist() == expect_c
    assert ext.int().tolist() == expect_e
    # B/32 at 224 px with 4 tasks of 1 cell: 54 queries x 58 keys (reference sheet 1.5)
    assert table1_mask(50, [1, 1, 1, 1]).shape == (54, 58)
    assert build_attention_mask(N, [True], [2], [()], mode="none").all()
    cross = build_attention_mask(N, [True, True], [1, 1], [(), ()], mode="cross_task")
    assert not cross[:N, N:].any() and cross[N:].all()


def test_model_mask_follows_extension_links():
    m = MemoryViT(tiny_vit())
    m.add_task("a", 2, cells=1)
    m.add_task("b", 2, cells=2, extend=True)
    m.add_task("c", 2, cells=1)
    mask = m.attention_mask(17)
    assert mask.shape == (20, 24)
    assert torch.equal(mask[17:].int(), torch.tensor([
        [1] * 17 + [1, 0, 0, 1, 0, 0, 0],
        [1] * 17 + [1, 1, 0, 1, 1, 1, 0],
        [1] * 17 + [0, 0, 1, 0, 0, 0, 1],
    ]))


def test_extension_semantics(images):
    bb = tiny_vit()
    m = MemoryViT(bb).eval()
    m.add_task("a", 4, cells=2)
    m.add_task("b", 4, cells=2, extend=True)
    m.add_task("c", 4, cells=2)  # concatenation semantics: reads nobody
    for s, n in enumerate("abc"):
        randomize_task(m, n, s)
    with torch.no_grad():
        before = m.forward_all(images)
        # change task a's memory (a random change: with memory_norm="pre" a constant shift is removed by the LN)
        m.tasks["a"].memory.add_(torch.randn(m.tasks["a"].memory.shape))
        after = m.forward_all(images)
        assert torch.equal(after[SOURCE], before[SOURCE])
        assert not torch.allclose(after["a"], before["a"])
        assert not torch.allclose(after["b"], before["b"])  # b reads a (extension)
        assert torch.equal(after["c"], before["c"])  # c does not
        m.tasks["b"].memory.add_(torch.randn(m.tasks["b"].memory.shape))
        m.tasks["b"].class_token.add_(torch.randn(m.tasks["b"].class_token.shape))
        after2 = m.forward_all(images)
        assert torch.equal(after2["a"], after["a"])  # never the other way round
        assert torch.equal(after2[SOURCE], before[SOURCE])
    # extension differs from concatenation for the later task, not the earlier one
    b_alone = copy.deepcopy(m.tasks["b"])
    b_alone.reads = ()
    conc = MemoryViT(bb).eval()
    conc.tasks["a"] = m.tasks["a"]
    conc.tasks["b"] = b_alone
    with torch.no_grad():
        e, c = m.forward_all(images), conc.forward_all(images)
    assert torch.equal(e["a"], c["a"]) and not torch.allclose(e["b"], c["b"])


def test_naive_merge_interferes(images):
    bb = tiny_vit()
    ma, mb = task_model(bb, "a", 3, seed=1), task_model(bb, "b", 3, seed=2)
    with torch.no_grad():
        ref = bb(images)
        alone_a = ma.forward_all(images)["a"]
        naive = naive_concatenate([ma, mb]).eval().forward_all(images)
        assert not torch.allclose(naive[SOURCE], ref, atol=1e-4)  # originals see the new tokens
        assert not torch.allclose(naive["a"], alone_a, atol=1e-4)
        prot = naive_concatenate([ma, mb], protect_source=True).eval().forward_all(images)
        assert torch.equal(prot[SOURCE], ref)  # source protected, tasks still interfere
        assert not torch.allclose(prot["a"], alone_a, atol=1e-4)
        # a single model without the mask is destructive too (memory seen by the original tokens)
        nomask = MemoryViT(bb, mask="none").eval()
        nomask.tasks.update(ma.tasks)
        assert not torch.allclose(nomask.forward_all(images)[SOURCE], ref, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning modes, trainable parameters, non-destructive training
# ----------------------------------------------------------------------------------------------------------
def test_finetune_modes_trainable_parameters(images):
    bb = tiny_vit()
    backbone_names = {n for n, _ in bb.named_parameters()}
    expected = {
        "head": {"tasks.t.head.weight", "tasks.t.head.bias"},
        "head+cls": {"tasks.t.head.weight", "tasks.t.head.bias", "tasks.t.class_token"},
        "memory": {"tasks.t.head.weight", "tasks.t.head.bias", "tasks.t.class_token", "tasks.t.memory"},
        "full": {"tasks.t.head.weight", "tasks.t.head.bias"}
        | {f"backbone.{n}" for n in backbone_names if not n.startswith("head.")},
    }
    assert set(FINETUNE_MODES) == set(expected)
    for mode, names in expected.items():
        m = finetune_model(bb, mode, num_classes=4, cells=3 if mode == "memory" else 0, task="t")
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == names, mode
        out = m(images)  # forward returns the task's logits only (engine contract)
        assert torch.is_tensor(out) and out.shape == (6, 4)
        out.logsumexp(-1).sum().backward()
        with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
        assert with_grad == names, mode
        m.zero_grad(set_to_none=True)
        if mode == "full":
            assert m.backbone is not bb  # the shared pre-trained backbone is never made trainable
        else:
            assert m.backbone is bb
    assert not any(p.requires_grad for p in bb.parameters())


def test_set_trainable_switches_modes_and_freezes_other_tasks():
    m = MemoryViT(tiny_vit())
    m.add_task("a", 3, cells=2)
    m.add_task("b", 3, cells=1)
    assert set_trainable(m, "memory", "b") == ["tasks.b.class_token", "tasks.b.memory", "tasks.b.head.weight",
                                               "tasks.b.head.bias"]
    assert set_trainable(m, "head", "a") == ["tasks.a.head.weight", "tasks.a.head.bias"]
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'linear'"):
        set_trainable(m, "linear", "a")
    with pytest.raises(ValueError, match="no task 'zzz'"):
        set_trainable(m, "head", "zzz")
    m.add_task("h", 3, class_token=False)
    with pytest.raises(ValueError, match="has none"):
        set_trainable(m, "head+cls", "h")


def test_training_memory_is_non_destructive(images):
    bb = tiny_vit()
    with torch.no_grad():
        ref = bb(images)
    m = finetune_model(bb, "memory", num_classes=3, cells=2, task="t")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    m.train()
    for _ in range(3):
        loss = F.cross_entropy(m(images), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"tasks.t.class_token", "tasks.t.memory", "tasks.t.head.weight", "tasks.t.head.bias"}
    m.eval().set_outputs(None)
    with torch.no_grad():
        assert torch.equal(m(images)[0], ref)


def test_ema_copy_and_outputs_selection(images):
    from timm.utils import ModelEmaV3

    m = finetune_model(tiny_vit(), "memory", num_classes=3, cells=1, task="t")
    ema = ModelEmaV3(m, decay=0.9)
    ema.update(m)
    with torch.no_grad():
        assert ema.module(images).shape == (6, 3)
    m.set_outputs([SOURCE, "t"])
    assert [o.shape[1] for o in m(images)] == [10, 3]
    with pytest.raises(ValueError, match="unknown outputs"):
        m.set_outputs("nope")


# ----------------------------------------------------------------------------------------------------------
# Parameter accounting
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cells,classes,total", [(1, 100, 86_884), (10, 100, 169_828), (5, 397, 352_141)])
def test_vit_b32_task_parameters(cells, classes, total):
    bb = timm.create_model("vit_base_patch32_224", device="meta", num_classes=21843)
    m = finetune_model(bb, "memory", num_classes=classes, cells=cells, task="t")
    counts = task_parameter_count(m, "t")
    assert counts["memory"] == 9_216 * cells
    assert counts["class_token"] == 768
    assert counts["head"] == 768 * classes + classes
    assert counts["total"] == total == memory_task_params(12, 768, cells, classes)
    assert bench.count_params(m)["trainable"] == total
    ref = {r.id: r.value for r in references.load("memory")}
    if (cells, classes) in ((1, 100), (10, 100)):
        assert ref[f"b32.memory-{cells}.c100.task_params"] == total


def test_vit_b32_mode_parameters_and_mask_shape():
    bb = timm.create_model("vit_base_patch32_224", device="meta")
    assert bench.count_params(finetune_model(bb, "head", 100))["trainable"] == 76_900
    assert bench.count_params(finetune_model(bb, "head+cls", 100))["trainable"] == 77_668
    full = finetune_model(bb, "full", 100)
    n_backbone = sum(p.numel() for p in bb.parameters())
    assert n_backbone == 88_224_232  # timm vit_base_patch32_224 with its 1000-class head
    assert bench.count_params(full)["trainable"] == n_backbone - 769_000 + 76_900  # original head frozen, unused
    m = MemoryViT(bb)
    for t in range(4):
        m.add_task(f"t{t}", 10, cells=1)
    assert m.attention_mask().shape == (54, 58)


def test_used_parameters_and_macs(images):
    bb = tiny_vit()
    plain = bench.count_macs(bb, input_size=(3, IMG, IMG))["macs"]
    m = MemoryViT(bb)
    assert bench.count_macs(m, input_size=(3, IMG, IMG))["macs"] == plain
    m.add_task("t", 5, cells=4)
    m.set_outputs("t")
    set_trainable(m, "memory", "t")
    assert bench.count_macs(m, input_size=(3, IMG, IMG))["macs"] > plain
    # every backbone parameter and every task parameter is used by the task output
    n_all = sum(p.numel() for p in m.parameters())
    assert bench.count_used_params(m, images[:2]) == n_all - sum(p.numel() for p in bb.head.parameters())


# ----------------------------------------------------------------------------------------------------------
# Backbone kinds and bad input
# ----------------------------------------------------------------------------------------------------------
def test_pooled_head_vit(images):
    bb = tiny_vit(class_token=False, global_pool="avg")
    assert bb.cls_token is None
    ma = task_model(bb, "a", 2, seed=1)  # token_init auto -> normal (no class token to copy)
    mb = task_model(bb, "b", 0, seed=2)
    mh = MemoryViT(bb).eval()
    mh.add_task("h", 4, class_token=False)
    randomize_task(mh, "h", 3)
    with torch.no_grad():
        ref = bb(images)
        merged = concatenate([ma, mb, mh]).eval().forward_all(images)
        assert torch.equal(merged[SOURCE], ref)
        assert torch.equal(merged["a"], ma.forward_all(images)["a"])
        assert torch.equal(merged["b"], mb.forward_all(images)["b"])
        assert torch.equal(merged["h"], mh.forward_all(images)["h"])
        assert merged["a"].shape == (6, 5)
    with pytest.raises(ValueError, match="token_init='copy' needs a backbone with a class token"):
        MemoryViT(bb).add_task("x", 3, token_init="copy")


def test_dynamic_image_size(images):
    bb = tiny_vit(dynamic_img_size=True)
    m = task_model(bb, "a", 2, seed=1)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(m.forward_all(x)[SOURCE], bb(x))
        maps = class_token_patch_attention(m, x)
    assert maps["a"].shape == (2, 3, 6, 5)


def test_unsupported_backbones_and_options():
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        MemoryViT(nn.Linear(3, 3))
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(ValueError, match="ResPostBlock"):
        MemoryViT(tiny_vit(block_fn=ResPostBlock))
    with pytest.raises(ValueError, match="global_pool=''"):
        MemoryViT(tiny_vit(global_pool=""))
    bb = tiny_vit()
    for kw, msg in [(dict(memory_norm="middle"), "unknown memory_norm 'middle'"), (dict(impl="fast"), "unknown impl"),
                    (dict(mask="table1"), "unknown mask 'table1'")]:
        with pytest.raises(ValueError, match=msg):
            MemoryViT(bb, **kw)
    m = MemoryViT(bb)
    with pytest.raises(ValueError, match="needs its own class token"):
        m.add_task("a", 3, cells=2, class_token=False)
    with pytest.raises(ValueError, match="reads names unknown tasks"):
        m.add_task("a", 3, reads=["zz"])
    m.add_task("a", 3)
    with pytest.raises(ValueError, match="already exists"):
        m.add_task("a", 3)
    with pytest.raises(ValueError, match="not 'source'"):
        m.add_task(SOURCE, 3)
    with pytest.raises(ValueError, match="needs cells >= 1"):
        finetune_model(bb, "memory", 3)
    with pytest.raises(ValueError, match="has no memory"):
        finetune_model(bb, "head", 3, cells=2)
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'lora'"):
        finetune_model(bb, "lora", 3)


def test_concatenate_errors(images):
    bb = tiny_vit()
    ma, mb = task_model(bb, "a", 1, seed=1), task_model(bb, "a", 1, seed=2)
    with pytest.raises(ValueError, match="task name 'a' is in model 0 and model 1; rename"):
        concatenate([ma, mb])
    mb.rename_task("a", "b")
    assert concatenate([ma, mb]).task_names == ["a", "b"]
    other = task_model(tiny_vit(seed=5), "c", 1, seed=3)  # same architecture, different weights
    with pytest.raises(ValueError, match=r"does not share model 0's backbone \(.*values differ"):
        concatenate([ma, other])
    # a shallower backbone: the missing block is named first, not hidden behind the "values differ" entries
    shallow = task_model(tiny_vit(seed=5, depth=2), "d", 1, seed=3)
    with pytest.raises(ValueError, match=r"backbone \(missing blocks\.2 \(\d+ tensors\), [^m]*values differ"):
        concatenate([ma, shallow])
    with pytest.raises(ValueError, match=r"backbone \(unexpected blocks\.2 \(\d+ tensors\), "):
        concatenate([shallow, ma])
    full = finetune_model(bb, "full", 3, task="f")
    with torch.no_grad():
        full.backbone.blocks[0].attn.qkv.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight values differ"):
        concatenate([ma, full])
    # an equal copy of the backbone is accepted
    mc = task_model(copy.deepcopy(bb), "c", 2, seed=4)
    with torch.no_grad():
        assert torch.equal(concatenate([ma, mc]).eval().forward_all(images)["c"], mc.forward_all(images)["c"])
    with pytest.raises(ValueError, match="memory_norm"):
        concatenate([ma, task_model(bb, "p", 1, seed=1, memory_norm="post")])
    with pytest.raises(ValueError, match="at least one"):
        concatenate([])


def test_task_state_round_trip_and_mismatch(images):
    bb = tiny_vit()
    m = task_model(bb, "a", 3, seed=1)
    state = m.task_state_dict("a")
    assert set(state) == {"class_token", "memory", "head.weight", "head.bias"}
    fresh = MemoryViT(bb).eval()
    fresh.load_task("a", state)
    with torch.no_grad():
        assert torch.equal(fresh.forward_all(images)["a"], m.forward_all(images)["a"])
    bad = dict(state, extra=torch.zeros(1))
    del bad["head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\], unexpected keys \['extra'\]"):
        MemoryViT(bb).load_task("x", bad)
    wrong = dict(state, memory=torch.zeros(2, 3, 48))
    with pytest.raises(ValueError, match=r"memory \(2, 3, 48\) != \(3, m, 48\)"):
        MemoryViT(bb).load_task("x", wrong)
    # a whole merged model round-trips through its state dict
    merged = concatenate([m, task_model(bb, "b", 1, seed=2)])
    sd = merged.state_dict()
    again = MemoryViT(tiny_vit())
    again.add_task("a", 5, cells=3)
    again.add_task("b", 5, cells=1)
    again.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(again.eval().forward_all(images)["b"], merged.eval().forward_all(images)["b"])


def test_create_memory_vit_from_local_checkpoint(tmp_path, images):
    bb = tiny_vit()
    path = tmp_path / "vit.pth"
    torch.save(bb.state_dict(), path)
    kw = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    m = create_memory_vit("vit_tiny_patch16_224", checkpoint_file=path, checkpoint_num_classes=10,
                          memory_norm="post", **kw).eval()
    assert m.memory_norm == "post" and not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert torch.equal(m(images)[0], bb(images))


# ----------------------------------------------------------------------------------------------------------
# Attention read-outs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["exact", "split", "joint"])
def test_attention_records(images, impl):
    bb = tiny_vit()
    m = MemoryViT(bb, impl=impl).eval()
    m.add_task("a", 3, cells=2)
    m.add_task("n", 3, cells=0)
    m.add_task("b", 3, cells=4, extend=True)
    for s, n in enumerate("anb"):
        randomize_task(m, n, s)
    with torch.no_grad():
        plain = m.forward_all(images)
        with record_attention(m) as rec:
            recorded = m.forward_all(images)
    for k in plain:
        torch.testing.assert_close(recorded[k], plain[k], atol=1e-5, rtol=1e-5)
    assert len(rec) == 3
    mask = m.attention_mask(17)
    for r in rec:
        assert r.source.shape == (6, 3, 17, 17) and r.tasks.shape == (6, 3, 3, 17 + 3 + 6)
        torch.testing.assert_close(r.tasks.sum(-1), torch.ones(6, 3, 3))
        assert torch.all(r.tasks[:, :, ~mask[17:]] == 0)  # masked keys get exactly zero attention
    mem = memory_attention(m, images)
    assert set(mem) == {"a", "b"} and mem["a"].shape == (3, 3, 2) and mem["b"].shape == (3, 3, 4)
    assert torch.equal(mem["a"], torch.stack([r.tasks[:, :, 0, 20:22] for r in rec], 1).mean(0))
    assert torch.equal(mem["b"], torch.stack([r.tasks[:, :, 2, 22:26] for r in rec], 1).mean(0))
    assert memory_attention(m, images, reduce="none")["b"].shape == (6, 3, 3, 4)
    maps = class_token_patch_attention(m, images, layer=1)
    assert set(maps) == {SOURCE, "a", "n", "b"} and maps["b"].shape == (6, 3, 4, 4)
    assert torch.equal(maps[SOURCE], rec[1].source[:, :, 0, 1:].reshape(6, 3, 4, 4))
    with pytest.raises(ValueError, match="unknown reduce"):
        memory_attention(m, images, reduce="sum")


# ----------------------------------------------------------------------------------------------------------
# Per-task data splits
# ----------------------------------------------------------------------------------------------------------
class _Toy(torch.utils.data.Dataset):
    def __init__(self, n=50):
        self.targets = [i % 10 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((1,), float(i)), self.targets[i]


def test_class_group_splits():
    ds = _Toy()
    groups = [[0, 1, 2, 3], [4, 5, 6], [9, 7, 8]]
    idx = class_group_indices(ds.targets, groups)
    assert [len(i) for i in idx] == [20, 15, 15]
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    tasks = make_task_datasets(ds, groups)
    x, y = tasks[2][0]
    assert int(x.item()) == 7 and y == 1  # class 7 is the second class of group [9, 7, 8]
    assert sorted(set(tasks[2].targets.tolist())) == [0, 1, 2]
    assert [tasks[1][i][1] for i in range(3)] == [0, 1, 2]
    assert all(ds.targets[int(tasks[0][i][0].item())] in groups[0] for i in range(len(tasks[0])))
    with pytest.raises(ValueError, match="class 3 is in group 0 and group 1"):
        class_group_indices(ds.targets, [[0, 3], [3, 4]])
    with pytest.raises(ValueError, match=r"classes \[11\] do not occur"):
        class_group_indices(ds.targets, [[0, 11]])
    with pytest.raises(ValueError, match="group 1 is empty"):
        class_group_indices(ds.targets, [[0], []])
    with pytest.raises(ValueError, match="targets has 3 entries"):
        make_task_datasets(ds, groups, targets=[0, 1, 2])
    t = torch.tensor(ds.targets)
    assert [len(i) for i in class_group_indices(t, [[1], [2, 3]])] == [5, 10]


def test_references_validate():
    refs = references.load("memory")
    by_id = {r.id: r for r in refs}
    assert by_id["b32.memory-1.sun397.top1"].value == 77.0
    assert by_id["b32.full.cifar100.top1"].value == 91.8
    assert by_id["b32.memory-20.places365.top1"].value == 54.1
    assert sum(r.kind == "paper" for r in refs) == 28
    assert {r.kind for r in refs} <= {"paper", "computed", "third_party"}


def test_remove_and_rename_tasks(images):
    bb = tiny_vit()
    m = MemoryViT(bb).eval()
    m.add_task("a", 3, cells=1)
    m.add_task("b", 3, cells=2, extend=True)
    randomize_task(m, "a", 1)
    randomize_task(m, "b", 2)
    m.rename_task("a", "first")
    assert m.task_names == ["first", "b"] and m.tasks["b"].reads == ("first",)
    with pytest.raises(ValueError, match="name taken or invalid"):
        m.rename_task("b", "first")
    m.set_outputs("b")
    with torch.no_grad():
        with_a = m(images)
        removed = m.remove_task("first")
        assert removed.cells == 1 and m.tasks["b"].reads == ()
        assert not torch.allclose(m(images), with_a)  # b no longer reads the removed task
        assert torch.equal(m.forward_all(images)[SOURCE], bb(images))
    m.remove_task("b")
    assert m.task_names == [] and len(m(images)) == 1  # output selection reset to all heads


def test_patch_attention_pooled_head_has_no_source_map(images):
    bb = tiny_vit(class_token=False, global_pool="avg")
    m = task_model(bb, "a", 2, seed=1)
    maps = class_token_patch_attention(m, images)
    assert set(maps) == {"a"} and maps["a"].shape == (6, 3, 4, 4)
    mem = memory_attention(m, images)["a"]
    assert mem.shape == (3, 3, 2) and bool(((mem >= 0) & (mem <= 1)).all())


@pytest.mark.gpu
def test_exactness_on_cuda():
    """On a GPU the original-token stream runs the same kernels on the same shapes as the plain backbone."""
    dev = torch.device("cuda")
    bb = tiny_vit().to(dev)
    x = torch.randn(8, 3, IMG, IMG, device=dev)
    ma, mb = task_model(bb, "a", 2, seed=1), task_model(bb, "b", 3, seed=2)
    merged = concatenate([ma, mb]).eval()
    with torch.no_grad():
        outs = merged.forward_all(x)
        assert torch.equal(outs[SOURCE], bb(x))
        torch.testing.assert_close(outs["a"], ma.forward_all(x)["a"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs["b"], mb.forward_all(x)["b"], atol=1e-5, rtol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = merged.forward_all(x)
            ref = bb(x)
        assert torch.equal(half[SOURCE], ref)
        assert all(torch.isfinite(v).all() for v in half.values())
