"""Batched variable-length attention for the vision tower: the same attention as one SDPA call per
segment, and the tiny backbone's image features unchanged when it is switched on."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from vlm2rec_lab.accel import attention, packing
from vlm2rec_lab.accel.checkpointing import checkpointed_every, enable_checkpointing
from vlm2rec_lab.accel.compile import compile_layers
from vlm2rec_lab.accel.attention import segment_groups, set_vision_attention, varlen_attention_forward, varlen_sdpa
from vlm2rec_lab.config import SpeedConfig


def _per_segment(q, k, v, lengths, scale):
    outs, a = [], 0
    for n in lengths:
        outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], scale=scale))
        a += n
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, total, heads, dim)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [4, 3, 5, 3, 4, 1], [7]])
def test_varlen_sdpa_is_per_segment_attention(lengths):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(1, 2, total, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    got = varlen_sdpa(q, k, v, cu, scaling=0.3)
    assert got.shape == (1, total, 2, 8)
    torch.testing.assert_close(got, _per_segment(q, k, v, lengths, 0.3), rtol=1e-5, atol=1e-6)
    # attention stays within segments: changing one segment's keys leaves the others' outputs alone
    k2 = k.clone()
    k2[:, :, : lengths[0]] += 5.0
    got2 = varlen_sdpa(q, k2, v, cu.clone(), scaling=0.3)
    torch.testing.assert_close(got2[:, lengths[0]:], got[:, lengths[0]:])


def test_segment_groups():
    (n, idx, count, nk, kidx), = segment_groups(torch.tensor([0, 3, 6, 9]))
    assert (n, idx, count, nk, kidx) == (3, None, 3, 3, None)
    groups = {n: (idx.tolist(), c, nk) for n, idx, c, nk, _ in segment_groups(torch.tensor([0, 2, 5, 7]))}
    assert groups == {2: ([0, 1, 5, 6], 2, 2), 3: ([2, 3, 4], 1, 3)}
    # segments 1 and 2 continue segment 0 (tokens 0-1): their keys are [0, 1] then their own
    groups = {(n, nk): (idx.tolist(), kidx.tolist()) for n, idx, c, nk, kidx
              in segment_groups(torch.tensor([0, 2, 4, 6]), prefix_of=[-1, 0, 0])}
    assert groups == {(2, 2): ([0, 1], [0, 1]), (2, 4): ([2, 3, 4, 5], [0, 1, 2, 3, 0, 1, 4, 5])}
    with pytest.raises(ValueError, match="names 2 segments"):
        segment_groups(torch.tensor([0, 2, 4, 6]), prefix_of=[-1, 0])


@pytest.mark.parametrize("hk", [4, 2])
def test_shared_prefix_attention_is_attention_over_the_whole_prompt(hk):
    """Segments that continue a shared prefix segment: their outputs equal causal attention over
    [prefix, segment] (the whole prompt), rows of the segment; the prefix's own rows are plain causal."""
    g = torch.Generator().manual_seed(3)
    lengths, prefix_of = [3, 2, 4, 4, 1, 5, 2], [-1, -1, 0, 0, 0, 1, -1]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 8, generator=g)
    k, v = (torch.randn(1, hk, total, 8, generator=g) for _ in range(2))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    got = varlen_sdpa(q, k, v, cu, scaling=0.4, causal=True, prefix_of=prefix_of)
    kr, vr = (t.repeat_interleave(4 // hk, dim=1) for t in (k, v))
    b = cu.tolist()
    for s, t in enumerate(prefix_of):
        rows = list(range(b[s], b[s + 1]))
        keys = (list(range(b[t], b[t + 1])) if t >= 0 else []) + rows
        full = F.scaled_dot_product_attention(q[:, :, keys], kr[:, :, keys], vr[:, :, keys], scale=0.4, is_causal=True)
        torch.testing.assert_close(got[:, rows], full[:, :, -len(rows):].transpose(1, 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="causal"):
        varlen_sdpa(q, k, v, cu, causal=False, prefix_of=prefix_of)


def test_flash_layout_lists_each_segments_prefix_then_own_keys():
    """The flash kernel's input for shared prefixes, checked on the CPU: per segment (in order, the
    empty one skipped), its queries and its gathered [prefix, own] keys under a lower-right causal
    mask give the grouped SDPA's output."""
    from torch.nn.attention.bias import causal_lower_right

    from vlm2rec_lab.accel.attention import _flash_layout, _plan

    g = torch.Generator().manual_seed(5)
    lengths, prefix_of = [3, 4, 0, 2, 4, 3], [-1, 0, -1, -1, 0, 3]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    q = torch.randn(1, 4, sum(lengths), 8, generator=g)
    k, v = (torch.randn(1, 2, sum(lengths), 8, generator=g) for _ in range(2))
    keys, cu_q, cu_k, max_q, max_k = _flash_layout(_plan(cu, prefix_of)[0], q.device)
    assert cu_q.tolist() == [0, 3, 7, 9, 13, 16] and cu_k.tolist() == [0, 3, 10, 12, 19, 24]
    assert (max_q, max_k) == (4, 7)
    want = varlen_sdpa(q, k, v, cu, causal=True, prefix_of=prefix_of)
    for i in range(len(cu_q) - 1):
        rows, kk = slice(cu_q[i], cu_q[i + 1]), keys[cu_k[i]:cu_k[i + 1]]
        o = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, kk], v[:, :, kk], enable_gqa=True,
                                           attn_mask=causal_lower_right(rows.stop - rows.start, len(kk)))
        torch.testing.assert_close(o.transpose(1, 2), want[:, rows], rtol=1e-5, atol=1e-6)


def test_shared_prefixes_split_prompts_that_begin_alike():
    from vlm2rec_lab.accel.attention import shared_prefixes

    def pos(n, start=0):
        return torch.arange(start, start + n).expand(3, -1)

    seqs = [torch.tensor(x) for x in ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 8], [1, 2, 3, 4, 5, 6, 9, 9],  # kind a
                                      [1, 2, 3, 4, 99, 99, 5],  # kind b: image token 99 stops the prefix at 4
                                      [1, 2, 3, 4, 99, 99, 6],
                                      [1, 2, 3, 4, 5, 6, 7])]  # kind c: alone, kept whole
    positions = [pos(len(s)) for s in seqs]
    positions[4] = torch.cat([pos(3), pos(len(seqs[4]) - 3, 10)], 1)  # b's positions part after token 3
    out, out_pos, prefix_of, n = shared_prefixes(seqs, positions, list("aaabbc"), stop_ids=(99,), min_length=3)
    assert n == 2 and prefix_of == [-1, -1, 0, 0, 0, 1, 1, -1]
    assert out[0].tolist() == [1, 2, 3, 4, 5] and out[1].tolist() == [1, 2, 3]  # a: up to 5 (6 is not in row 1's prefix)
    assert [x.tolist() for x in out[2:]] == [[6, 7], [8], [6, 9, 9], [4, 99, 99, 5], [4, 99, 99, 6], [1, 2, 3, 4, 5, 6, 7]]
    for s, p, whole, wp in zip(out[2:], out_pos[2:], seqs, positions):  # the rest keeps its own positions
        torch.testing.assert_close(p, wp[:, len(wp[0]) - len(s):])
    # a prefix shorter than min_length is not shared
    assert shared_prefixes(seqs, positions, list("aaabbc"), stop_ids=(99,), min_length=6)[3] == 0


def test_causal_grouped_query_segments():
    """Causal attention within segments with fewer key/value heads (the language model's case)."""
    g = torch.Generator().manual_seed(2)
    lengths = [5, 3, 5, 2]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 8, generator=g)
    k, v = (torch.randn(1, 2, total, 8, generator=g) for _ in range(2))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    outs, a = [], 0
    for n in lengths:
        outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], kr[:, :, a:a + n], vr[:, :, a:a + n], is_causal=True))
        a += n
    torch.testing.assert_close(varlen_sdpa(q, k, v, cu, causal=True), torch.cat(outs, dim=2).transpose(1, 2),
                               rtol=1e-5, atol=1e-6)


def test_only_unmasked_segment_attention_is_accepted():
    q = torch.randn(1, 1, 4, 2)
    cu = torch.tensor([0, 4])
    with pytest.raises(NotImplementedError, match="unmasked"):
        varlen_attention_forward(None, q, q, q, attention_mask=torch.ones(1, 4), cu_seq_lens_q=cu)
    with pytest.raises(NotImplementedError, match="share their segments"):
        varlen_attention_forward(None, q, q, q, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 2, 4]))


def test_tiny_backbone_image_features_are_unchanged_with_batched_attention(tiny, monkeypatch):
    """Images of different sizes (so windows of several lengths): the vision tower's output with the
    batched attention equals the stock per-window path, and the batched path is the one that ran."""
    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 8, 8], [1, 4, 4]])
    g = torch.Generator().manual_seed(1)
    px = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    with torch.no_grad():
        set_vision_attention(tiny.model, varlen=False)
        stock = tiny.image_features(px, grids)
        calls = []
        real = attention.varlen_sdpa
        monkeypatch.setattr(attention, "varlen_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert set_vision_attention(tiny.model, varlen=True)
        batched = tiny.image_features(px, grids)
    assert calls and tiny.model.config.text_config._attn_implementation != attention.NAME
    for a, b in zip(stock, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vision_index_inputs_joined_per_grid_equal_the_towers_functions(tiny):
    """Index tensors joined from each distinct grid's pieces (with offsets) equal those the modeling
    module's functions compute for the whole list: grids of several sizes, windows cut by the image
    edge, a grid of two frames; and again from remembered pieces."""
    import sys

    from vlm2rec_lab.accel.vision_index import vision_index_inputs
    from vlm2rec_lab.backbones import unwrap

    visual = unwrap(tiny.model).visual
    mod = sys.modules[type(visual).__module__]
    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 8, 8], [1, 4, 4], [1, 6, 10], [1, 2, 2], [2, 4, 6], [1, 4, 8]])
    m = visual.spatial_merge_size
    pos = mod.get_vision_position_ids(grids, m)
    cu, _ = mod.get_vision_attention_seqlens(grids, visual.config)
    window, cu_window = mod.get_vision_window_index(grids, spatial_merge_size=m, window_size=visual.window_size,
                                                    patch_size=visual.patch_size)
    pieces = {}
    for _ in range(2):
        kw, bounds = vision_index_inputs(visual, grids, "cpu", pieces)
        assert len(pieces) == 6  # one per distinct grid
        for name, want in (("position_ids", pos), ("cu_seqlens", cu), ("window_index", window), ("cu_window_seqlens", cu_window)):
            assert kw[name].dtype == want.dtype and torch.equal(kw[name], want), name
        assert kw["max_seqlen"] == int(cu.diff().max()) and kw["max_window_seqlen"] == int(cu_window.diff().max())
        assert bounds["cu_seqlens"] is not None and torch.equal(bounds["cu_window_seqlens"], cu_window)


@pytest.mark.parametrize("varlen", [False, True])
def test_vision_index_inputs_from_the_cpu_are_the_towers_own(tiny, monkeypatch, varlen):
    """With the vision tower's index tensors (rotary positions, window order, image and window
    bounds) worked out on the CPU, the features are bit for bit the tower's own. The tower takes
    every one of them (each of its functions finds its tensors in its arguments instead of
    computing them), none of them reaches the blocks beyond what the blocks take, and each distinct
    grid's pieces are worked out once."""
    import sys

    from vlm2rec_lab.accel.vision_index import takes_vision_index_inputs
    from vlm2rec_lab.backbones import unwrap

    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 8, 8], [1, 4, 4]])
    px = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    base = unwrap(tiny.model)
    assert takes_vision_index_inputs(base.visual) and not takes_vision_index_inputs(torch.nn.Linear(2, 2))
    set_vision_attention(tiny.model, varlen=varlen)
    with torch.no_grad(), tiny.engine.compute(autocast=False):
        own = base.get_image_features(px, grids, return_dict=True).pooler_output
    mod = sys.modules[type(base.visual).__module__]
    found = []

    def spy(name, keys):
        real = getattr(mod, name)

        def f(*a, kwargs=None, **k):
            found.append((name, bool(kwargs) and all(kwargs.get(key) is not None for key in keys)))
            return real(*a, kwargs=kwargs, **k)
        monkeypatch.setattr(mod, name, f)

    spy("get_vision_position_ids", ["position_ids"])
    spy("get_vision_attention_seqlens", ["cu_seqlens", "max_seqlen"])
    spy("get_vision_window_index", ["window_index", "cu_window_seqlens"])
    block_kwargs = []
    hook = base.visual.blocks[0].register_forward_pre_hook(lambda mod_, a, kw: block_kwargs.append(set(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            ours = tiny.image_features(px, grids)
            again = tiny.image_features(px, grids)
    finally:
        hook.remove()
    # three distinct grids worked out here (not found), then the tower finds all of its tensors, twice
    assert [f for _, f in found].count(False) == 3 * 3 and len(found) == 3 * 3 + 2 * 3
    assert all(f for _, f in found[9:])
    assert block_kwargs and all(k <= {"cu_seqlens", "max_seqlen", "position_embeddings"} for k in block_kwargs)
    assert len(ours) == len(own) == 4 and set(tiny.vision_index.pieces) == {(1, 8, 8), (1, 4, 8), (1, 4, 4)}
    for a, b, c in zip(ours, again, own):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_mixed_precision_context_is_a_no_op_on_the_cpu(tiny):
    with tiny.engine.compute():
        assert not torch.is_autocast_enabled("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_precision_lora_matches_peft_casting_on_gpu(synth_ds, tiny_path):
    """bf16 LoRA under autocast (fp32 master weights) against PEFT's fp32 LoRA path: same embeddings
    within bf16 tolerance, and gradients reach the LoRA weights in fp32."""
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.train import apply_lora

    backbone = load_backbone("tiny", dataset=synth_ds, device="cuda")
    apply_lora(backbone, TrainConfig(method="vlm-sft").resolved())
    enc = Encoder(backbone, synth_ds.items, SpeedConfig(packed=False))
    lists = [[0, 1, 2], [3, 4]]
    out = {}
    for mixed in (False, True):
        backbone.engine.fused = mixed
        backbone.model.zero_grad()
        z = enc.embed_sets([("T", lists)])[0]
        z.pow(2).sum().backward()
        grads = [p.grad for p in backbone.model.parameters() if p.requires_grad]
        assert all(gr is not None and gr.dtype == torch.float32 for gr in grads)
        out[mixed] = z.detach()
    torch.testing.assert_close(out[True], out[False], rtol=2e-2, atol=2e-2)


def _lora_tiny(synth_ds):
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.train import apply_lora

    backbone = load_backbone("tiny", dataset=synth_ds, device="cpu")
    apply_lora(backbone, TrainConfig(method="vlm-sft").resolved())
    for n, p in backbone.model.named_parameters():  # LoRA B starts at zero: make the adapters do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return backbone


def test_packed_forward_gives_the_padded_embeddings_and_gradients(synth_ds, tiny_path, monkeypatch):
    """A training step's four prompt sets (histories of different lengths, text and image) packed into
    one forward, with and without shared prefixes: the same embeddings and the same LoRA gradients
    as four padded forwards. The prefixes are really shared (one per prompt kind). In a packed
    forward the last layer's MLP runs on the 20 prompts' last tokens only (the padded forwards: on
    every token)."""
    from vlm2rec_lab.accel import attention
    from vlm2rec_lab.encoder import Encoder

    backbone = _lora_tiny(synth_ds)
    lists, items = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10]], [[11], [12], [13], [14]]
    requests = [("T", lists), ("V", lists), ("T", items), ("V", items), ("I", lists)]
    seen, last_mlp_rows = [], []
    real = attention.shared_prefixes
    monkeypatch.setattr(attention, "shared_prefixes", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    backbone.decoder_layers()[-1].mlp.up_proj.register_forward_pre_hook(lambda m, args: last_mlp_rows.append(args[0].shape[:-1]))
    results = {}
    for packed, share in ((False, False), (True, False), (True, True)):
        enc = Encoder(backbone, synth_ds.items, SpeedConfig(packed=packed, share_prefix=share))
        backbone.model.zero_grad()
        last_mlp_rows.clear()
        out = enc.embed_sets(requests)
        sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in out).backward()
        grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
        results[packed, share] = ([o.detach() for o in out], grads)
        if packed:
            assert last_mlp_rows == [(1, 20)]
        else:  # (one padded forward per prompt set, every position)
            assert len(last_mlp_rows) == 5 and all(r[0] == 4 and r[1] > 10 for r in last_mlp_rows)
    (seqs, _, prefix_of, n_prefixes), = seen
    assert n_prefixes == 3 and prefix_of.count(-1) == 3  # T, V and I prompts each share their head
    assert all(len(seqs[k]) > 10 for k in range(3))  # system turn and prompt head at least
    ref = results[False, False]
    for key in ((True, False), (True, True)):
        for a, b in zip(ref[0], results[key][0]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert results[key][1].keys() == ref[1].keys()
        for n, g in ref[1].items():
            torch.testing.assert_close(results[key][1][n], g, rtol=1e-3, atol=1e-5, msg=f"{key} {n}")


def test_requests_packed_apart_keep_their_graphs_apart(synth_ds, tiny_path, monkeypatch):
    """``embed_sets(forward_groups=)``, as a probed training micro-batch uses it: text histories, image
    histories and targets in forwards of their own give the embeddings of one packed forward, from a
    layout worked out beforehand too; a gradient of the text histories' embeddings runs backward
    through their forward alone (the others' outputs see no gradient), where with one forward it
    runs through all prompts. A grouping that misses or repeats a request is an error."""
    from vlm2rec_lab.encoder import Encoder

    backbone = _lora_tiny(synth_ds)
    lists, items = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10]], [[11], [12], [13], [14]]
    requests = [("T", lists), ("V", lists[:3]), ("T", items), ("V", items)]  # 4, 3 and 8 prompts
    enc = Encoder(backbone, synth_ds.items, SpeedConfig(packed=True, share_prefix=True))
    real, reached = packing.forward_packed, []

    def forward_packed(backbone, seqs, *a, **k):  # note which forwards a backward reaches (by their prompt count)
        out = real(backbone, seqs, *a, **k)
        out.register_hook(lambda g, n=len(seqs): reached.append(n))
        return out

    monkeypatch.setattr(packing, "forward_packed", forward_packed)
    whole = enc.embed_sets(requests)
    apart = enc.embed_sets(requests, enc.layout(requests), forward_groups=((0,), (1,), (2, 3)))
    for a, b in zip(whole, apart):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    lora = [p for p in backbone.model.parameters() if p.requires_grad]
    g_apart = torch.autograd.grad(apart[0].sum(), lora, allow_unused=True)
    assert reached == [4]  # the text histories' forward only: 4 prompts (shared prefixes are their own segments)
    g_whole = torch.autograd.grad(whole[0].sum(), lora, allow_unused=True)
    assert reached == [4, 15]  # the one forward of all 15 prompts
    for a, b in zip(g_whole, g_apart):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    for bad in (((0,), (1,), (2,)), ((0, 1), (1,), (2, 3))):
        with pytest.raises(ValueError, match="exactly one group"):
            enc.embed_sets(requests, forward_groups=bad)


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_packed_forwards_recompute_in_their_own_state(synth_ds, tiny_path, monkeypatch, every):
    """Gradient checkpointing (every layer, or every 2nd) with a packed forward, shared prefixes and
    LoRA dropout: the same embeddings and LoRA gradients as without checkpointing. The backward's
    recomputations run the packed attention (with the prefixes) and the fused LoRA stand-ins again,
    once per checkpointed layer, draw the same dropout masks, and leave nothing swapped in. The last
    layer's recomputed MLP, like its forward, runs on the prompts' last tokens only."""
    from vlm2rec_lab.accel import attention, fused
    from vlm2rec_lab.encoder import Encoder

    backbone = _lora_tiny(synth_ds)
    for m in backbone.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    backbone.model.train()
    layers = backbone.decoder_layers()
    requests = [("T", [[0, 1, 2], [3, 4]]), ("V", [[0, 1, 2], [3, 4]]), ("T", [[5], [6]]), ("V", [[5], [6]])]
    enc = Encoder(backbone, synth_ds.items, SpeedConfig(share_prefix=True))
    calls = {"attention": 0, "lora": 0}
    real_sdpa, real_lora = attention.varlen_sdpa, fused.fused_forward

    def count(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f

    monkeypatch.setattr(attention, "varlen_sdpa", count("attention", real_sdpa))
    monkeypatch.setattr(fused, "fused_forward", count("lora", real_lora))
    backbone.engine.forget()  # (the stand-ins are bound from fused.fused_forward when first found)
    last_mlp_rows = []
    layers[-1].mlp.up_proj.register_forward_pre_hook(lambda m, args: last_mlp_rows.append(args[0].shape[1]))
    results = {}
    for ckpt in (False, True):
        if ckpt:
            enable_checkpointing(backbone, every)
        assert checkpointed_every(backbone) == (every if ckpt else 0)
        backbone.model.zero_grad()
        torch.manual_seed(0)
        out = enc.embed_sets(requests)
        forward = dict(calls)
        params = [p for p in backbone.model.parameters() if p.requires_grad]
        loss = sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in out)
        # as in a probed training step: two gradient passes that keep the graph, then the backward
        probes = [torch.autograd.grad(part, params, retain_graph=True, allow_unused=True) for part in (out[0].sum(), out[1].sum())]
        loss.backward()
        recomputed = {k: calls[k] - forward[k] for k in calls}
        calls.update(attention=0, lora=0)
        results[ckpt] = ([o.detach() for o in out], {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad},
                         probes)
        n_ckpt = 3 * len(range(0, len(layers), every)) if ckpt else 0  # (three backward passes)
        assert recomputed == {"attention": n_ckpt, "lora": n_ckpt * forward["lora"] // len(layers)}
        last_recomputed = ckpt and (len(layers) - 1) % every == 0
        assert last_mlp_rows == [8] * (1 + 3 * last_recomputed)  # 8 prompts, in the forward and each recomputation
        last_mlp_rows.clear()
    assert not backbone.engine.computing and attention.packed_state() is None
    assert not any("forward" in vars(m) for m in backbone.model.modules() if hasattr(m, "lora_A"))
    for a, b in zip(*(results[k][0] for k in (False, True))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-6, atol=1e-7, msg=n)
    for a, b in zip(results[False][2], results[True][2]):
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
    # Hugging Face's own switch afterwards: every layer, and reported so
    backbone.model.get_base_model().activation_checkpointing_enable()
    assert checkpointed_every(backbone) == 1


def test_prefixes_are_shared_only_where_that_changes_nothing(synth_ds, tiny_path, monkeypatch):
    """With LoRA dropout drawing masks (training), prompts would share the prefix's mask: the default
    keeps their prefixes apart; in evaluation, or when asked (share_prefix=True), they are shared."""
    from vlm2rec_lab.accel import attention
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.train import apply_lora

    backbone = load_backbone("tiny", dataset=synth_ds, device="cpu")
    apply_lora(backbone, TrainConfig(method="vlm-sft", lora_dropout=0.2).resolved())
    calls = []
    real = attention.shared_prefixes
    monkeypatch.setattr(attention, "shared_prefixes", lambda *a, **k: calls.append(1) or real(*a, **k))
    requests = [("T", [[0, 1], [2, 3]])]
    for share, training, expect in ((None, True, 0), (None, False, 1), (True, True, 1), (False, False, 0)):
        calls.clear()
        backbone.model.train(training)
        assert backbone.engine.dropout_active == training
        Encoder(backbone, synth_ds.items, SpeedConfig(share_prefix=share)).embed_sets(requests)
        assert len(calls) == expect, (share, training)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_layers_give_the_same_packed_step(synth_ds, tiny_path, checkpointed):
    """torch.compile over the decoder layers (traced through PEFT and around the packed attention;
    ``aot_eager`` here, inductor on a GPU): the same embeddings and LoRA gradients, and the state
    dict keeps its names (adapters save and load as before). Also with every 2nd layer checkpointed
    (that layer then runs uncompiled, its recomputation in its own state)."""
    from vlm2rec_lab.encoder import Encoder

    lists, items = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]], [[11], [12], [13]]
    requests = [("T", lists), ("V", lists), ("T", items), ("V", items)]
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        backbone = _lora_tiny(synth_ds)
        backbone.model.train()
        keys = set(backbone.model.state_dict())
        if compiled:
            if checkpointed:
                enable_checkpointing(backbone, 2)
            assert compile_layers(backbone, backend="aot_eager") == 2
            assert set(backbone.model.state_dict()) == keys
        out = Encoder(backbone, synth_ds.items).embed_sets(requests)
        sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in out).backward()
        results[compiled] = ([o.detach() for o in out],
                             {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad})
    for a, b in zip(results[False][0], results[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


def test_the_varlen_kernel_setting(monkeypatch):
    """flash by default (VLM2REC_VARLEN_KERNEL unset), switchable, checked; on the CPU (fp32) the
    flash setting falls back to the grouped SDPA (the same numbers); the flash kernel only on NVIDIA
    cards of compute capability 8.0 or newer."""
    import subprocess
    import sys

    from vlm2rec_lab.accel.attention import flash_usable, set_varlen_kernel

    env = {k: v for k, v in os.environ.items() if k != "VLM2REC_VARLEN_KERNEL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    probe = "from vlm2rec_lab.accel import attention; print(attention._kernel)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "flash"
    with pytest.raises(ValueError, match="one of"):
        set_varlen_kernel("fast")
    before = set_varlen_kernel("sdpa")
    try:
        assert set_varlen_kernel("flash") == "sdpa" and attention._kernel == "flash"
        q, k, v = (torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
        cu = torch.tensor([0, 4, 9])
        torch.testing.assert_close(varlen_sdpa(q, k, v, cu, causal=True), _per_segment_causal(q, k, v, [4, 5]))
    finally:
        set_varlen_kernel(before)
    for capability, hip, usable in (((7, 5), None, False), ((8, 0), None, True), ((9, 0), None, True), ((9, 0), "6.2", False)):
        flash_usable.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert flash_usable(torch.device("cuda", 0)) is usable, (capability, hip)
    flash_usable.cache_clear()


def _per_segment_causal(q, k, v, lengths):
    outs, a = [], 0
    for n in lengths:
        outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], is_causal=True))
        a += n
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("causal", [False, True, "prefix"])
def test_flash_varlen_kernel_matches_grouped_sdpa_on_gpu(causal, monkeypatch):
    """PyTorch's variable-length flash kernel against the grouped SDPA, bf16, grouped-query heads:
    outputs and input gradients within bf16 tolerance; also with shared prefixes (the flash call's
    causal mask aligned at the end of each segment's [prefix, own] keys)."""
    from vlm2rec_lab.accel.attention import set_varlen_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [64, 17, 64, 33, 5]
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda")
    base = [torch.randn(1, h, total, 64, device="cuda", dtype=torch.bfloat16, generator=g) for h in (8, 2, 2)]
    res, ran = {}, []
    real = attention._flash_varlen
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a, **k: (lambda o: ran.append(o is not None) or o)(real(*a, **k)))
    for kernel in ("sdpa", "flash"):
        before = set_varlen_kernel(kernel)
        try:
            q, k, v = (t.clone().requires_grad_(True) for t in base)
            prefix_of = [-1, 0, -1, 0, 2] if causal == "prefix" else None
            out = varlen_sdpa(q, k, v, cu.clone(), scaling=0.125, causal=bool(causal), prefix_of=prefix_of)
            out.float().pow(2).sum().backward()
            res[kernel] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
        finally:
            set_varlen_kernel(before)
    assert ran and all(ran)  # the flash kernel did run (not the SDPA fallback)
    for a, b in zip(res["sdpa"], res["flash"]):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)


def test_compiled_vision_blocks_give_the_same_features(tiny):
    grids = torch.tensor([[1, 8, 8], [1, 4, 8]])
    px = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = tiny.image_features(px, grids)
        assert compile_layers(tiny, backend="aot_eager", vision=True) == 2 + 2  # decoder layers + vision blocks
        compiled = tiny.image_features(px, grids)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kernel", ["sdpa", "flash"])
def test_vision_tower_never_waits_for_the_device_on_gpu(synth_ds, tiny_path, kernel, monkeypatch):
    """The vision tower with its index tensors from the CPU (grids given on the CPU) makes no device
    sync from its first operator to the per-image split (CUDA's sync debug mode set to raise for the
    whole call), for a list of grids seen before and for a new one; a first call outside the check
    runs the stand-ins' one-time checks."""
    from vlm2rec_lab.backbones import load_backbone

    monkeypatch.setattr(attention, "_kernel", kernel)
    backbone = load_backbone("tiny", dataset=synth_ds, device="cuda")
    assert backbone.model.visual.config._attn_implementation == attention.NAME  # (load_backbone's setting)
    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 8, 8], [1, 4, 4]])
    px = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda", dtype=backbone.dtype)
    with torch.no_grad():
        backbone.image_features(px, grids)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            seen = backbone.image_features(px, grids)
            new = backbone.image_features(px[:64].repeat(3, 1), grids[[0, 0, 0]])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(seen) == 4 and len(new) == 3
    torch.testing.assert_close(new[1].float(), seen[0].float(), rtol=2e-2, atol=2e-2)  # (the same image)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kernel", ["sdpa", "flash"])
def test_packed_layers_never_wait_for_the_device_on_gpu(synth_ds, tiny_path, kernel, monkeypatch):
    """A packed forward's decoder layers make no device sync (CUDA's sync debug mode set to raise
    from the first layer to the final norm): the attention plan was worked out on the CPU and the
    layers compare boundaries by identity, so the CPU can queue layer after layer ahead of the GPU.
    Training mode with LoRA, prompts with images and shared prefixes (twice, each step's forward
    followed by its backward, which runs outside the check)."""
    from vlm2rec_lab.accel import attention
    from vlm2rec_lab.backbones import load_backbone, unwrap
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.train import apply_lora

    monkeypatch.setattr(attention, "_kernel", kernel)
    backbone = load_backbone("tiny", dataset=synth_ds, device="cuda")
    apply_lora(backbone, TrainConfig(method="vlm-sft").resolved())
    backbone.model.train()
    enc = Encoder(backbone, synth_ds.items, SpeedConfig(share_prefix=True))
    enc.cache_all()
    lm = unwrap(backbone.model).language_model
    hooks = [lm.layers[0].register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")),
             lm.norm.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode(0))]
    requests = [("T", [[0, 1, 2], [3, 4]]), ("V", [[0, 1, 2], [3, 4]]), ("T", [[5], [6]]), ("V", [[5], [6]])]
    try:
        for _ in range(2):
            z = enc.embed_sets(requests)
            sum(o.sum() for o in z).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for h in hooks:
            h.remove()
    assert all(p.grad is not None for p in backbone.model.parameters() if p.requires_grad)


def test_compiled_layers_compile_once_for_every_length(synth_ds, tiny_path):
    """A long run must not recompile as lengths change: once a packed training step (forward,
    backward and the probe's forwards apart) and an item embedding pass have run, packed steps of
    other token and segment counts and chunks of other image counts, down to one image, add no
    graph (dynamic shapes; the attention, outside the graphs, takes the segment bounds), nor does a
    second model of the same shape. Compiling the vision blocks routes the tower's attention
    through the varlen function, on the CPU too."""
    from torch._dynamo.utils import counters

    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.probe import PROBE_FORWARDS

    torch._dynamo.reset()  # (graphs and counts of earlier tests out of the way)
    try:
        backbone = _lora_tiny(synth_ds)
        assert compile_layers(backbone, backend="aot_eager", vision=True) == 2 + 2
        assert backbone.base_config.vision_config._attn_implementation == attention.NAME
        enc = Encoder(backbone, synth_ds.items, SpeedConfig(cache_vision=False))
        rng = np.random.default_rng(0)

        def step(n_users: int, groups=None) -> None:
            backbone.model.train()
            lists = [rng.integers(0, len(synth_ds.items), int(k)).tolist() for k in rng.integers(1, 11, n_users)]
            targets = [[int(i)] for i in rng.integers(0, len(synth_ds.items), n_users)]
            out = enc.embed_sets([("T", lists), ("V", lists), ("T", targets), ("V", targets)], forward_groups=groups)
            sum(o.sum() for o in out).backward()

        def embed(n_items: int) -> None:
            backbone.model.eval()
            enc.features.clear()
            with torch.no_grad():
                for kind in ("T", "V"):
                    enc.item_embeddings(kind, rng.choice(len(synth_ds.items), n_items, replace=False), batch_size=16)

        step(4), step(4, PROBE_FORWARDS), embed(24)
        graphs = counters["stats"]["unique_graphs"]
        for n in (2, 7, 3):
            step(n)
        step(5, PROBE_FORWARDS)
        for n in (9, 40, 1):
            embed(n)
        assert counters["stats"]["unique_graphs"] == graphs
        backbone = _lora_tiny(synth_ds)  # a second model of the same shape reuses the graphs
        compile_layers(backbone, backend="aot_eager", vision=True)
        enc = Encoder(backbone, synth_ds.items, SpeedConfig(cache_vision=False))
        step(3), embed(5)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
