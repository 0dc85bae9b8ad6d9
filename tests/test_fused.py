"""The compute path's fused stand-ins: LoRA's update folded into one addmm (or merged into the weight),
RMSNorm in one kernel, the patch embedding as a GEMM, the vision attention's rotary without fp32
copies, each the same function as the forward it replaces (values and gradients), used only where it
is."""
from functools import partial

import pytest
import torch
from torch import nn

from vlm2rec_lab.accel.fused import fusable, fused_forward, fused_forwards, is_plain_rms_norm, rms_norm_forward
from vlm2rec_lab.config import SpeedConfig


def _lora_layer(**kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20))
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=12, target_modules=["0"], **kw))
    layer = peft.base_model.model[0]
    for p in layer.parameters():  # B starts at zero: give the adapter something to add
        if p.requires_grad:
            nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_forward_is_pefts_forward(shape, dropout):
    layer = _lora_layer(lora_dropout=dropout).train()
    assert fusable(layer)
    x = torch.randn(*shape, requires_grad=True)
    results = []
    for fn in (lambda: type(layer).forward(layer, x), lambda: fused_forward(layer, x)):
        torch.manual_seed(1)  # the same dropout mask for both
        y = fn()
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        grads = torch.autograd.grad((y * w).sum(), [x] + [p for p in layer.parameters() if p.requires_grad])
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert y1.shape == y0.shape == (*shape[:-1], 20)
    assert (y0 - layer.base_layer(x)).abs().max() > 1e-2  # the adapter does contribute
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_forward_under_autocast_matches_pefts_within_bf16():
    """The GPU's compute path in miniature (CPU autocast to bf16, PEFT's input casting off, as
    ``SpeedEngine.compute`` sets it): fused and PEFT's forward agree within bf16 rounding."""
    layer = _lora_layer().eval()
    x = torch.randn(6, 12)
    layer.cast_input_dtype_enabled = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = type(layer).forward(layer, x), fused_forward(layer, x)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_only_plain_lora_layers_are_fused():
    assert not fusable(_lora_layer(use_dora=True))
    assert not fusable(nn.Linear(3, 3))
    layer = _lora_layer()
    x = torch.randn(3, 12)
    layer.enable_adapters(False)  # disabled adapters: fused_forward defers to PEFT (the base layer alone)
    torch.testing.assert_close(fused_forward(layer, x), layer.base_layer(x))


def test_the_backbones_compute_path_uses_it_and_gives_pefts_numbers(synth_ds, tiny_path):
    """The tiny backbone with LoRA: embeddings and LoRA gradients through the fused path equal PEFT's
    own path (``engine.fused = False``); inside ``engine.compute()`` the LoRA layers run the fused forward,
    outside it (and nested inside it) PEFT's is restored."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.train import apply_lora

    backbone = load_backbone("tiny", dataset=synth_ds, device="cpu")
    apply_lora(backbone, TrainConfig(method="vlm-sft").resolved())
    for n, p in backbone.model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    layers = [m for m in backbone.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(fusable(m) for m in layers)
    norms = [m for m in backbone.model.modules() if type(m).__name__.endswith("RMSNorm")]
    swapped = {id(m) for m, _ in fused_forwards(backbone.model)}
    assert norms and all(id(m) in swapped for m in norms + layers)  # LM and vision norms, every adapter
    assert id(backbone.model.visual.patch_embed) in swapped
    px, grid = backbone.preprocess_images([Encoder(backbone, synth_ds.items)._load_image(k) for k in (0, 1)])
    feats = {}
    for mixed in (False, True):  # the vision tower: HF's Conv3d patch embedding, then the stand-in
        backbone.engine.fused = mixed
        feats[mixed] = torch.cat(backbone.image_features(px, grid))
    torch.testing.assert_close(feats[True], feats[False], rtol=1e-5, atol=1e-5)
    marker = layers[0].forward  # an instance forward set by someone else (a hook, say) is put back after
    layers[0].forward = marker
    with backbone.engine.compute():
        with backbone.engine.compute():
            pass
        # bound methods of one function: compiled layers guard on their code, the same for every layer
        assert all(vars(m)["forward"].__func__ is fused_forward for m in layers)
    assert vars(layers[0])["forward"] is marker and not any("forward" in vars(m) for m in layers[1:])
    del layers[0].forward
    enc = Encoder(backbone, synth_ds.items)
    requests = [("T", [[0, 1, 2], [3, 4]]), ("V", [[0, 1, 2], [3, 4]]), ("T", [[5], [6]]), ("V", [[5], [6]])]
    out = {}
    for mixed in (False, True):
        backbone.engine.fused = mixed
        backbone.model.zero_grad()
        z = enc.embed_sets(requests)
        sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in z).backward()
        out[mixed] = ([o.detach() for o in z], {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad})
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_stand_in_is_hugging_faces_norm(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    norm = Qwen2_5_VLRMSNorm(48, eps=1e-5).to(dtype)
    nn.init.normal_(norm.weight, 1.0, 0.2, generator=torch.Generator().manual_seed(0))
    assert is_plain_rms_norm(norm)
    x = (torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1)) * 4).to(dtype).requires_grad_(True)
    want, got = norm(x), rms_norm_forward(norm, x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.linspace(-1, 1, want.numel()).view_as(want).to(dtype)
    ga = torch.autograd.grad((want * g).sum(), [x, norm.weight])
    gb = torch.autograd.grad((got * g).sum(), [x, norm.weight])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_norms_that_compute_something_else_are_left_alone():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + weight), as Gemma's: not the plain norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    assert not is_plain_rms_norm(GemmaLikeRMSNorm())
    assert not is_plain_rms_norm(nn.LayerNorm(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_stand_in_is_the_conv3d(dtype):
    """Qwen2.5-VL's patch embedding (a Conv3d whose stride is its kernel) as one F.linear: the same
    numbers (fp32 to float rounding, bf16 to bf16 rounding), gradients included."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from vlm2rec_lab.accel.fused import is_plain_patch_embed, patch_embed_forward

    torch.manual_seed(0)
    embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40).to(dtype)
    assert is_plain_patch_embed(embed)
    x = torch.randn(37, 3 * 2 * 14 * 14, requires_grad=True)  # the processor's flattened patches (fp32)
    want, got = embed(x), patch_embed_forward(embed, x)
    assert got.shape == want.shape == (37, 40) and got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = torch.linspace(-1, 1, want.numel()).view_as(want).to(dtype)
    for a, b in zip(torch.autograd.grad((want * g).sum(), [x, embed.proj.weight]),
                    torch.autograd.grad((got * g).sum(), [x, embed.proj.weight])):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol * 10)


def test_overlapping_or_strided_convolutions_are_not_patch_embeddings():
    from vlm2rec_lab.accel.fused import is_plain_patch_embed

    class OverlapPatchEmbed(nn.Module):  # stride smaller than the kernel: a real convolution
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 2, 2), bias=False)

        def forward(self, x):
            return self.proj(x.view(-1, 3, 2, 4, 4)).view(-1, 8)

    assert not is_plain_patch_embed(OverlapPatchEmbed())
    assert not is_plain_patch_embed(nn.Linear(3, 3))


@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)])
def test_merged_forward_is_the_adapted_layer_without_gradients(shape):
    """x·(W + s·BA)ᵀ + bias equals the fused (and so PEFT's) forward in evaluation mode; where a
    gradient is wanted or the dropout draws masks, the merged forward is the fused forward."""
    from vlm2rec_lab.accel.fused import MERGED, mergeable, merged_forward, merged_weight

    layer = _lora_layer(lora_dropout=0.3).eval()
    w0 = layer.base_layer.weight.clone()
    assert mergeable(layer)
    layer.__dict__[MERGED] = merged_weight(layer)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=0)  # the layer itself untouched
    x = torch.randn(*shape)
    with torch.no_grad():
        want = type(layer).forward(layer, x)
        got = merged_forward(layer, x)
    assert (want - layer.base_layer(x)).abs().max() > 1e-2  # the adapter does contribute
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.lora_B["default"].weight.data.zero_()  # stale merged weight: used only where it is asked for
    with torch.no_grad():
        assert (merged_forward(layer, x) - type(layer).forward(layer, x)).abs().max() > 1e-2
    layer.lora_B["default"].weight.data.normal_(std=0.3)
    layer.__dict__[MERGED] = merged_weight(layer)
    xg = x.clone().requires_grad_(True)  # a gradient wanted: the adapter's own product, gradients reach it
    y = merged_forward(layer, xg)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and xg.grad is not None
    torch.testing.assert_close(y.detach(), fused_forward(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()  # dropout drawing masks: not merged
    assert not mergeable(layer)
    with torch.no_grad():
        torch.manual_seed(3)
        a = merged_forward(layer, x)
        torch.manual_seed(3)
        b = fused_forward(layer, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_merged_weight_serves_only_the_adapter_and_scaling_it_was_made_for():
    """Another adapter made active, or the scaling changed, after the merge: the merged forward is
    the adapter's own forward again, never the stale merged weight."""
    from peft import LoraConfig, get_peft_model

    from vlm2rec_lab.accel.fused import MERGED, merged_forward, merged_weight

    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(12, 20)), LoraConfig(r=4, lora_alpha=12, target_modules=["0"]))
    peft.add_adapter("other", LoraConfig(r=4, lora_alpha=12, target_modules=["0"]))
    layer = peft.base_model.model[0].eval()
    for name in ("default", "other"):
        nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    layer.__dict__[MERGED] = merged_weight(layer)  # made for "default"
    stale = lambda x: torch.nn.functional.linear(x, layer.__dict__[MERGED][2], layer.base_layer.bias)  # noqa: E731
    x = torch.randn(5, 12)
    with torch.no_grad():
        layer.set_adapter("other")
        want = type(layer).forward(layer, x)
        assert (want - stale(x)).abs().max() > 1e-2
        torch.testing.assert_close(merged_forward(layer, x), want, rtol=1e-5, atol=1e-5)
        layer.set_adapter("default")
        torch.testing.assert_close(merged_forward(layer, x), type(layer).forward(layer, x), rtol=1e-5, atol=1e-5)
        layer.scale_layer(0.5)  # the scaling changed: the merged weight no longer applies
        want = type(layer).forward(layer, x)
        assert (want - stale(x)).abs().max() > 1e-2
        torch.testing.assert_close(merged_forward(layer, x), want, rtol=1e-5, atol=1e-5)


def test_merged_forward_in_bf16_agrees_with_pefts_forward_within_bf16():
    from vlm2rec_lab.accel.fused import MERGED, merged_forward, merged_weight

    layer = _lora_layer().eval()
    layer.base_layer.to(torch.bfloat16)
    layer.__dict__[MERGED] = merged_weight(layer)
    assert layer.__dict__[MERGED][2].dtype == torch.bfloat16
    x = torch.randn(6, 12)
    layer.cast_input_dtype_enabled = False
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = type(layer).forward(layer, x)
        got = merged_forward(layer, x)
        bare = layer.base_layer(x)
    assert got.dtype == torch.bfloat16 and (want.float() - bare.float()).abs().max() > 0.1
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _adapted_tiny(synth_ds, **train):
    """The tiny backbone with a LoRA adapter whose B is random (PEFT starts it at zero), as after training."""
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.train import apply_lora

    backbone = load_backbone("tiny", dataset=synth_ds, device="cpu")
    apply_lora(backbone, TrainConfig(method="vlm-sft", **train).resolved())
    for n, p in backbone.model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return backbone


def test_embedding_merges_the_adapters_and_leaves_the_model_as_it_was(synth_ds, tiny_path, monkeypatch):
    """``Encoder.embed_many`` computes with the LoRA updates merged into the weights: the same item and
    history embeddings as the adapters in training form (fp32), through the merged forward; afterwards
    the weights, the swapped forwards and the memory are as before, and a changed adapter is merged
    afresh. No merging where dropout draws masks, or where the budget is too small."""
    from vlm2rec_lab.accel import fused
    from vlm2rec_lab.encoder import Encoder

    backbone = _adapted_tiny(synth_ds, lora_dropout=0.2)
    calls = []
    real = fused.merged_forward
    monkeypatch.setattr(fused, "merged_forward", lambda layer, x, *a, **k: calls.append(1) or real(layer, x, *a, **k))
    backbone.model.train()  # dropout drawing masks: nothing merges
    with backbone.engine.merged_adapters() as n:
        assert n == 0
    backbone.model.eval()
    n_lora = sum(fusable(m) for m in backbone.model.modules())
    with backbone.engine.merged_adapters(budget_bytes=10) as n:  # too little memory to spare: nothing merges
        assert n == 0
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    hist = synth_ds.histories("test")[:9]
    out = {}
    for merge in (False, True, False):
        enc = Encoder(backbone, synth_ds.items, SpeedConfig(merge_adapters=merge), batch_size=8)
        calls.clear()
        out[merge] = [enc.item_embeddings(k, range(20)) for k in ("T", "V")] + [enc.sequence_embeddings(k, hist) for k in ("T", "V")]
        assert bool(calls) == merge
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, v in backbone.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0, msg=k)
    assert not any(fused.MERGED in vars(m) for m in backbone.model.modules())
    assert all(f.__func__ is fused.fused_forward for m, f in backbone.engine.modules().swaps if fusable(m))
    with backbone.engine.merged_adapters() as n:
        assert n == n_lora > 0
    with backbone.model.disable_adapter():  # the adapters do change the embeddings
        bare = Encoder(backbone, synth_ds.items, batch_size=8).item_embeddings("T", range(20))
    assert (bare - out[True][0]).abs().max() > 1e-3
    for n_, p in backbone.model.named_parameters():  # an updated adapter: merged afresh, not a stale weight
        if "lora_B" in n_:
            p.data.mul_(-1)
    enc = Encoder(backbone, synth_ds.items, batch_size=8)
    new = enc.item_embeddings("T", range(20))
    torch.testing.assert_close(new, Encoder(backbone, synth_ds.items, SpeedConfig(merge_adapters=False), batch_size=8).item_embeddings("T", range(20)),
                               rtol=1e-5, atol=1e-5)
    assert (new - out[True][0]).abs().max() > 1e-3


def test_embedding_steps_down_where_a_batch_runs_out_of_memory(synth_ds, tiny_path, monkeypatch, caplog):
    """A batch that runs out of memory is redone, and the rest embedded, first without the merged
    weights (their copies take memory), then in batches half as large: every row in its place, the
    same embeddings, a warning for each step down. Out of memory with one prompt a batch is an error
    that says so; other errors pass through untouched."""
    import logging

    from vlm2rec_lab.accel import fused
    from vlm2rec_lab.encoder import Encoder

    backbone = _adapted_tiny(synth_ds)
    backbone.model.eval()
    hist = synth_ds.histories("test")[:18]
    want = Encoder(backbone, synth_ds.items, SpeedConfig(merge_adapters=False), batch_size=4).sequence_embeddings("V", hist)
    enc = Encoder(backbone, synth_ds.items, batch_size=8)
    real, seen = Encoder.embed_sets, []

    def embed_sets(self, requests, *a, **k):
        merged = any(fused.MERGED in vars(m) for m in backbone.model.modules())
        seen.append((merged, len(requests[0][1])))
        if (merged and len(seen) == 2) or len(requests[0][1]) > 3:  # the 2nd merged batch; batches over 3
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, requests, *a, **k)

    monkeypatch.setattr(Encoder, "embed_sets", embed_sets)
    with caplog.at_level(logging.WARNING, logger="vlm2rec_lab.accel.recovery"):
        got = enc.sequence_embeddings("V", hist)
    # 8 merged (out of memory), 8 unmerged (out), 4 (out), then batches of 2 for all 18 rows
    assert seen == [(True, 8), (False, 8), (False, 4)] + [(False, 2)] * 9
    assert [r.getMessage().split(":")[-1].strip() for r in caplog.records] == ["going on unmerged", "going on in batches of 4",
                                                                               "going on in batches of 2"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(fused.MERGED in vars(m) for m in backbone.model.modules())
    monkeypatch.setattr(Encoder, "embed_sets", lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError, match="out of device memory with one prompt a batch"):
        enc.sequence_embeddings("V", hist)
    monkeypatch.setattr(Encoder, "embed_sets", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        enc.sequence_embeddings("V", hist)


def _vision_attention(dtype=torch.float32, heads=4, width=32):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    torch.manual_seed(0)
    attn = Qwen2_5_VLVisionAttention(Qwen2_5_VLVisionConfig(hidden_size=width, num_heads=heads)).to(dtype).eval()
    attn.config._attn_implementation = "sdpa"
    return attn


def _count_rotary(monkeypatch) -> list:
    """Calls of ``fused.rotary`` from now on (one per tensor rotated), as a list that grows."""
    from vlm2rec_lab.accel import fused

    calls, real = [], fused.rotary
    monkeypatch.setattr(fused, "rotary", lambda *a: calls.append(1) or real(*a))
    return calls


def _angles(n, dim, seed=1):
    a = torch.randn(n, dim // 2, generator=torch.Generator().manual_seed(seed)) * 3
    a = torch.cat([a, a], -1)  # the vision rotary's layout: the same angles in both halves
    return a.cos(), a.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_hugging_faces_vision_rotary(dtype):
    """``rotary`` on q and k taken as views of a fused qkv output (Hugging Face's layout) against
    ``apply_rotary_pos_emb_vision``: fp32 to float rounding; bf16 within two units in bf16's last
    place of the largest value (HF rounds once at the end, the stand-in once more per half). Angles
    that broadcast ``x`` to a larger shape (a leading batch) give HF's larger result too."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from vlm2rec_lab.accel.fused import rotary

    qkv = (torch.randn(50, 3, 4, 16, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    q, k, _ = qkv.unbind(1)
    cos, sin = _angles(50, 16)
    want = apply_rotary_pos_emb_vision(q, k, cos, sin)
    for x, w in zip((q, k), want):
        got = rotary(x, cos[:, None], sin[:, None])
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        scale = float(x.float().abs().max())
        tol = 1e-6 * scale if dtype == torch.float32 else 2 ** -7 * scale
        assert float((got.float() - w.float()).abs().max()) <= tol
    # the halves are not interchangeable: distinct angles per half still give HF's numbers
    a = torch.randn(50, 16, generator=torch.Generator().manual_seed(5))
    got = rotary(q.float(), a.cos()[:, None], a.sin()[:, None])
    torch.testing.assert_close(got, apply_rotary_pos_emb_vision(q.float(), k.float(), a.cos(), a.sin())[0])
    batched = torch.stack([a, a.flip(0)])[:, :, None]  # (2, tokens, 1, dim) against (tokens, heads, dim)
    got = rotary(q.float(), batched.cos(), batched.sin())
    assert got.shape == (2, 50, 4, 16)
    torch.testing.assert_close(got, q.float() * batched.cos() + torch.cat([-q[..., 8:], q[..., :8]], -1).float() * batched.sin())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_attention_stand_in_is_the_modules_forward(dtype):
    """The vision attention with ``rotary``, attending through the varlen function, against the
    module's own forward through the same function: two images' windows of several lengths. The
    probe puts the attention setting back and keeps the attention plans a forward has primed."""
    from vlm2rec_lab.accel.attention import NAME, _plan, prime_plan, register_varlen
    from vlm2rec_lab.accel.fused import is_plain_vision_attention, vision_attention_forward

    attn = _vision_attention(dtype)
    primed = [torch.tensor([0, 3, 3 + k], dtype=torch.int32) for k in range(1, 5)]  # four plans a forward primed
    for cu in primed:
        prime_plan(cu, cu.clone())
    plans = [_plan(cu) for cu in primed]
    assert is_plain_vision_attention(attn)
    assert attn.config._attn_implementation == "sdpa"  # (the probe put it back)
    assert all(_plan(cu) is p for cu, p in zip(primed, plans))  # and kept the primed plans
    register_varlen()
    attn.config._attn_implementation = NAME
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    cu = torch.tensor([0, 16, 24, 40], dtype=torch.int32)
    pe = _angles(40, 8)
    with torch.no_grad():
        want = attn(x, cu, position_embeddings=pe)
        got = vision_attention_forward(attn, x, cu, position_embeddings=pe)
    assert got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()))


def test_vision_attention_stand_in_falls_back_where_it_does_not_apply(monkeypatch):
    """The module's own forward (and no ``rotary``) where the tower attends per window through SDPA;
    where a gradient is wanted, the module's gradients; attentions computing something else fail
    the probe."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from vlm2rec_lab.accel import fused
    from vlm2rec_lab.accel.attention import NAME, register_varlen

    attn = _vision_attention()
    calls = _count_rotary(monkeypatch)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    cu, pe = torch.tensor([0, 8, 16], dtype=torch.int32), _angles(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused.vision_attention_forward(attn, x, cu, position_embeddings=pe),
                                   attn(x, cu, position_embeddings=pe))
    assert not calls  # SDPA per window: the module's forward
    register_varlen()
    attn.config._attn_implementation = NAME
    grads = []
    for f in (attn, partial(fused.vision_attention_forward, attn)):
        xg = x.clone().requires_grad_()
        g = torch.autograd.grad((f(xg, cu, position_embeddings=pe) * torch.linspace(-1, 1, 32)).sum(),
                                [xg, attn.qkv.weight])
        grads.append(g)
    assert len(calls) == 2  # q and k, in the differentiable form
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    class InterleavedVisionAttention(Qwen2_5_VLVisionAttention):  # rotary on (even, odd) pairs: another function
        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kw):
            cos, sin = position_embeddings
            n = hidden_states.shape[0]
            q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)

            def rot(t):
                pairs = torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2)
                return t * cos[:, None] + pairs * sin[:, None]

            out = torch.nn.functional.scaled_dot_product_attention(*(u.transpose(0, 1) for u in (rot(q), rot(k), v)))
            return self.proj(out.transpose(0, 1).reshape(n, -1))

    odd = InterleavedVisionAttention(attn.config)
    assert not fused.is_plain_vision_attention(odd)
    assert not fused.is_plain_vision_attention(nn.Linear(4, 4))
    assert odd.config._attn_implementation == NAME  # (left as it was)


def test_tiny_vision_tower_with_the_rotary_stand_in_is_the_towers_own(tiny, monkeypatch):
    """The tiny backbone's vision tower on the compute path (stand-ins in, varlen attention) against
    Hugging Face's own modules with the same attention: images of several sizes, the stand-in in
    every block."""
    from vlm2rec_lab.accel.attention import set_vision_attention
    from vlm2rec_lab.backbones import unwrap

    base = unwrap(tiny.model)
    set_vision_attention(tiny.model, varlen=True)
    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 4, 4]])
    px = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    tiny.image_features(px[-16:], grids[2:])  # (finds the stand-ins: their probes run the rotary too)
    calls = _count_rotary(monkeypatch)
    with torch.no_grad():
        own = base.get_image_features(px, grids, return_dict=True).pooler_output
        assert not calls
        got = tiny.image_features(px, grids)
    assert len(calls) == 2 * len(base.visual.blocks)
    for a, b in zip(got, own):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_vision_attention_stand_in_on_gpu():
    """On a GPU in bf16, at the 3B tower's width: the probe accepts the module (mixed-dtype kernels
    writing into bf16 halves work there), and the stand-in's output through the flash path is the
    module's own within bf16, for 4 images of 224 px in windows of 64 patches."""
    from vlm2rec_lab.accel.attention import NAME, register_varlen
    from vlm2rec_lab.accel.fused import is_plain_vision_attention, vision_attention_forward

    attn = _vision_attention(torch.bfloat16, heads=16, width=1280).cuda()
    assert is_plain_vision_attention(attn)
    register_varlen()
    attn.config._attn_implementation = NAME
    x = torch.randn(1024, 1280, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    cu = torch.arange(0, 1025, 64, dtype=torch.int32, device="cuda")
    pe = tuple(t.cuda() for t in _angles(1024, 80))
    with torch.no_grad():
        want = attn(x, cu, position_embeddings=pe)
        got = vision_attention_forward(attn, x, cu, position_embeddings=pe)
    assert got.dtype == torch.bfloat16 and got.is_cuda
    assert float((got.float() - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())
