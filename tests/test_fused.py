"""The compute path's fused stand-ins: LoRA's update folded into one addmm and RMSNorm in one kernel,
each the same function as the forward it replaces (values and gradients), used only where it is."""
import pytest
import torch
from torch import nn

from vlm2rec_lab.fused import fusable, fused_forward, fused_forwards, is_plain_rms_norm, rms_norm_forward


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
    ``Backbone.compute`` sets it): fused and PEFT's forward agree within bf16 rounding."""
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
    own path (``mixed_precision=False``); inside ``compute()`` the LoRA layers run the fused forward,
    outside it (and nested inside it) PEFT's is restored."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.train import apply_lora

    bb = load_backbone("tiny", dataset=synth_ds, device="cpu")
    apply_lora(bb, TrainConfig(method="vlm-sft").resolved())
    for n, p in bb.model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    layers = [m for m in bb.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(fusable(m) for m in layers)
    norms = [m for m in bb.model.modules() if type(m).__name__.endswith("RMSNorm")]
    swapped = {id(m) for m, _ in fused_forwards(bb.model)}
    assert norms and all(id(m) in swapped for m in norms + layers)  # LM and vision norms, every adapter
    assert id(bb.model.visual.patch_embed) in swapped
    px, grid = bb.preprocess_images([Encoder(bb, synth_ds.items)._load_image(k) for k in (0, 1)])
    feats = {}
    for mixed in (False, True):  # the vision tower: HF's Conv3d patch embedding, then the stand-in
        bb.mixed_precision = mixed
        feats[mixed] = torch.cat(bb.image_features(px, grid))
    torch.testing.assert_close(feats[True], feats[False], rtol=1e-5, atol=1e-5)
    marker = layers[0].forward  # an instance forward set by someone else (a hook, say) is put back after
    layers[0].forward = marker
    with bb.compute():
        with bb.compute():
            pass
        # bound methods of one function: compiled layers guard on their code, the same for every layer
        assert all(vars(m)["forward"].__func__ is fused_forward for m in layers)
    assert vars(layers[0])["forward"] is marker and not any("forward" in vars(m) for m in layers[1:])
    del layers[0].forward
    enc = Encoder(bb, synth_ds.items)
    requests = [("T", [[0, 1, 2], [3, 4]]), ("V", [[0, 1, 2], [3, 4]]), ("T", [[5], [6]]), ("V", [[5], [6]])]
    out = {}
    for mixed in (False, True):
        bb.mixed_precision = mixed
        bb.model.zero_grad()
        z = enc.embed_sets(requests)
        sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in z).backward()
        out[mixed] = ([o.detach() for o in z], {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.requires_grad})
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

    from vlm2rec_lab.fused import is_plain_patch_embed, patch_embed_forward

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
    from vlm2rec_lab.fused import is_plain_patch_embed

    class OverlapPatchEmbed(nn.Module):  # stride smaller than the kernel: a real convolution
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 2, 2), bias=False)

        def forward(self, x):
            return self.proj(x.view(-1, 3, 2, 4, 4)).view(-1, 8)

    assert not is_plain_patch_embed(OverlapPatchEmbed())
    assert not is_plain_patch_embed(nn.Linear(3, 3))
