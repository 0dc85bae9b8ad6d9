import pytest
import torch

from vlm2rec_lab.backbones import last_token_pool, lora_target_regex
from vlm2rec_lab.config import SpeedConfig, TrainConfig
from vlm2rec_lab.encoder import Encoder
from vlm2rec_lab.prompts import sequence_prompt
from vlm2rec_lab.tiny import TinyConfig, build_tiny
from vlm2rec_lab.train import apply_lora


def test_prompts_follow_the_paper():
    assert sequence_prompt("T", ["Red Hat", "Blue Shoe"]) == \
        "Describe this item text sequence in one word, 0) Red Hat, 1) Blue Shoe"
    assert sequence_prompt("V", ["x"]) == "Describe this item image sequence in one word, 0) <image>"
    assert sequence_prompt("I", ["a", "b"]) == "Describe this item sequence in one word, 0) a <image>, 1) b <image>"
    with pytest.raises(ValueError):
        sequence_prompt("X", ["a"])


def test_last_token_pool_left_and_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(h, right).tolist() == [h[0, 1].tolist(), h[1, 3].tolist()]
    assert last_token_pool(h, left).tolist() == [h[0, 3].tolist(), h[1, 3].tolist()]


def test_tiny_is_a_qwen2_5_vl_loaded_by_from_pretrained(tiny, tiny_path):
    assert (tiny_path / "config.json").exists() and (tiny_path / "tokenizer.json").exists()
    assert tiny.info["model_type"] == "qwen2_5_vl" and tiny.kind == "vlm"
    text = tiny.base_config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert "<|im_start|>assistant\n" in tiny.render("hi <image>") and "<|vision_start|>" in tiny.render("<image>")


def test_tiny_build_is_deterministic_per_seed(synth_ds, tmp_path):
    cfg = TinyConfig(pretrain_steps=3)
    a = build_tiny(synth_ds, seed=1, cache_dir=tmp_path / "a", cfg=cfg, progress=False)
    b = build_tiny(synth_ds, seed=1, cache_dir=tmp_path / "b", cfg=cfg, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_lora_goes_on_the_language_model_only(tiny):
    apply_lora(tiny, TrainConfig(method="vlm-sft").resolved())
    names = [n for n, p in tiny.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    import re

    assert re.fullmatch(lora_target_regex("vlm"), "model.language_model.layers.0.mlp.gate_proj")
    assert not re.fullmatch(lora_target_regex("vlm"), "model.visual.blocks.0.mlp.gate_proj")


def test_cached_and_uncached_vision_give_the_same_embeddings(tiny, synth_ds):
    hist = synth_ds.histories("test")[:6]
    cached = Encoder(tiny, synth_ds.items, SpeedConfig(cache_vision=True))
    plain = Encoder(tiny, synth_ds.items, SpeedConfig(cache_vision=False))
    for kind in ("V", "I"):
        a = cached.sequence_embeddings(kind, hist, batch_size=4)
        b = plain.sequence_embeddings(kind, hist, batch_size=3)
        assert torch.allclose(a, b, atol=1e-5), kind
    assert torch.allclose(cached.item_embeddings("V", [0, 1, 2]), plain.item_embeddings("V", [0, 1, 2]), atol=1e-5)


def test_padding_side_and_batching_do_not_change_embeddings(tiny, synth_ds):
    enc = Encoder(tiny, synth_ds.items)
    hist = synth_ds.histories("test")[:5]
    left = enc.sequence_embeddings("T", hist, batch_size=5)
    tiny.tokenizer.padding_side = "right"
    right = enc.sequence_embeddings("T", hist, batch_size=5)
    single = torch.cat([enc.sequence_embeddings("T", hist[k:k + 1]) for k in range(5)])
    assert torch.allclose(left, right, atol=1e-4) and torch.allclose(left, single, atol=1e-4)


def test_multimodal_positions_are_passed(tiny, synth_ds):
    """Without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions: ours differ from that."""
    enc = Encoder(tiny, synth_ds.items)
    texts = enc._expand_image_tokens([tiny.render(enc.prompts("V", [[0, 1]])[0])], enc.vision_features([0, 1])[1])
    tok = tiny.tokenizer(texts, return_tensors="pt")
    feats, grid = enc.vision_features([0, 1])
    ours = tiny.forward(tok["input_ids"], tok["attention_mask"], image_grid_thw=grid, image_features=feats)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    flat = tiny.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], image_grid_thw=grid, use_cache=False,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}).last_hidden_state
    assert not torch.allclose(ours, flat, atol=1e-4)


def test_missing_images_are_a_clear_error(tiny, synth_ds):
    items = synth_ds.items.copy()
    items.loc[0, "image"] = None
    with pytest.raises(ValueError, match="have no image"):
        Encoder(tiny, items).item_embeddings("V", [0])


@pytest.mark.parametrize("cache_vision", [True, False])
def test_text_only_llm_backbone_refuses_image_prompts(tiny, synth_ds, cache_vision):
    tiny.kind, tiny.image_processor = "llm", None  # as a real text-only model loads
    with pytest.raises(ValueError, match="text-only"):
        Encoder(tiny, synth_ds.items, SpeedConfig(cache_vision=cache_vision)).item_embeddings("V", [0, 1])


def test_a_processor_that_ignores_max_pixels_is_an_error(monkeypatch, tiny_path):
    from transformers import AutoImageProcessor

    from vlm2rec_lab.backbones import _image_processor

    class Fixed:  # a processor with its own fixed size policy
        size = {"longest_edge": 3136}

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", lambda *a, **kw: Fixed())
    assert isinstance(_image_processor(str(tiny_path), None), Fixed)
    with pytest.raises(ValueError, match="did not take max_pixels=50176"):
        _image_processor(str(tiny_path), 50176)


def test_max_pixels_sets_the_image_processors_size(synth_ds, tiny_path):
    """``load_backbone(max_pixels=...)`` reaches the processor (its size is a ``SizeDict`` in
    transformers 5, which an ``isinstance(size, dict)`` check silently skipped): a 500 px image
    becomes 224 x 224 px = 16 x 16 patches of 14 px, 64 visual tokens after the 2 x 2 merge."""
    from PIL import Image

    from vlm2rec_lab.backbones import load_backbone

    im = Image.new("RGB", (500, 500), (120, 30, 200))
    small = load_backbone("tiny", dataset=synth_ds, device="cpu")
    big = load_backbone("tiny", dataset=synth_ds, device="cpu", max_pixels=224 * 224)
    assert small.prepare_pixels([im])[1].tolist() == [[1, 4, 4]]  # the tiny default: 56 x 56 px
    px, grid = big.prepare_pixels([im])
    assert grid.tolist() == [[1, 16, 16]] and big.tokens_per_image(grid[0]) == 64
    assert px.shape == (256, 3 * 2 * 14 * 14)
