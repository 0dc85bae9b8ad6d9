"""The embedded default backbone ``tiny``: a Qwen2.5-VL-architecture model built locally for a
dataset (tokenizer, vision calibration, a short generic pretraining), saved, and loaded back through
the very same ``from_pretrained`` path as a real one (docs/method.md §1)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import atomic_dir
from .prompts import prompt_words


def cache_root() -> Path:
    """Where built backbones are kept: $VLM2REC_CACHE, else ~/.cache/vlm2rec_lab."""
    return Path(os.environ.get("VLM2REC_CACHE") or Path.home() / ".cache" / "vlm2rec_lab")


# Qwen's chat template for string content (the default system turn included), so that the tiny
# model's prompts have the same shape as a real Qwen2.5-VL's.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


@dataclass
class TinyConfig:
    """Shape of the embedded tiny Qwen2.5-VL and its short generic pretraining."""

    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    vocab_size: int = 1024
    image_pixels: int = 56 * 56  # 64 px images -> 56 x 56 -> 4 x 4 patches -> 4 visual tokens
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    thumbnail: int = 8  # the pretraining's image reconstruction target: a thumbnail x thumbnail RGB grid
    reconstruction_weight: float = 10.0  # weight of that reconstruction term beside the captioning loss

    def mrope_section(self) -> list[int]:
        """Rotary dimensions for (time, height, width); they sum to head_dim / 2."""
        half = self.hidden_size // self.heads // 2
        quarter = half // 4
        return [half - 2 * ((half - quarter) // 2), (half - quarter) // 2, (half - quarter) // 2]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` trained on ``texts``, with Qwen's special tokens
    and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def build_tiny_once(dataset, seed: int, cache_dir) -> Path:
    """:func:`build_tiny`, one builder at a time under a launcher (whose processes all load the
    backbone, so all come here): rank 0 builds it (or finds it) while the others wait; then the
    first process of every other machine, which finds it where the cache folder is shared and
    builds it where not; then the rest, which find it. Several processes building into one cache
    folder at once can read a folder that another is swapping out."""
    from .accel import distributed as dist

    def build() -> Path:
        return build_tiny(dataset, seed=seed, cache_dir=cache_dir)

    if not dist.is_distributed():
        return build()
    path = build() if dist.rank() == 0 else None
    dist.barrier()
    path = path or (build() if dist.local_rank() == 0 else None)
    dist.barrier()
    return path or build()


def build_tiny(dataset, seed: int = 0, cache_dir: str | Path | None = None, cfg: TinyConfig | None = None,
               progress: bool = True) -> Path:
    """Build (once per dataset fingerprint, seed and config) the embedded tiny Qwen2.5-VL for
    ``dataset``: a byte-level BPE tokenizer trained on its titles and the prompt words, a small
    Qwen2.5-VL, an image processor with a small ``max_pixels``, a data-dependent calibration of the
    vision merger and a short generic pretraining (captioning and image reconstruction, see
    :func:`_pretrain`) so that "vanilla" means pretrained-but-not-tuned. Deterministic per seed.
    Returns the folder it is saved in, which ``from_pretrained`` loads like any model."""
    if dataset is None:
        raise ValueError("the tiny backbone is built for a dataset: pass dataset=")
    cfg = cfg or TinyConfig()
    key = hashlib.sha1(json.dumps({"cfg": asdict(cfg), "data": dataset.fingerprint, "seed": seed,
                                   "v": 3}, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else cache_root() / "backbones"
    out = root / f"tiny-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    titles = [t for t in dataset.items["title"].tolist() if isinstance(t, str)]
    tokenizer = train_tokenizer(titles + prompt_words() + ["Describe this item."], cfg.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    mcfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": cfg.mrope_section(), "rope_theta": 10000.0}),
        vision_config=dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                           num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[cfg.vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(mcfg)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.image_pixels, max_pixels=cfg.image_pixels,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    _calibrate_vision(model, image_processor, dataset, seed)
    _pretrain(model, tokenizer, image_processor, dataset, cfg, seed, progress)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        (tmp / "vlm2rec_tiny.json").write_text(json.dumps({"tiny": asdict(cfg), "seed": seed,
                                                            "dataset_fingerprint": dataset.fingerprint}, indent=2))
    return out


@torch.no_grad()
def _calibrate_vision(model, image_processor, dataset, seed: int, n: int = 256) -> None:
    """Data-dependent init of the vision merger's output layer (ours, in the spirit of LSUV): a
    small random vision tower outputs nearly the same large vector for every image, which drowns the
    image content in the language model. Rescale the last linear layer so that, over a sample of
    the catalogue's images, each output dimension is centred with the spread of the text token
    embeddings. A real pretrained VLM needs no such step; it is part of building ``tiny`` only."""
    import numpy as np
    from PIL import Image

    paths = [p for p in dataset.items["image"].tolist() if isinstance(p, str)] if "image" in dataset.items else []
    if not paths:
        return
    pick = np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False)
    images = []
    for k in sorted(pick):
        with Image.open(paths[k]) as im:
            images.append(im.convert("RGB"))
    px = image_processor(images=images, return_tensors="pt")
    feats = torch.cat(list(model.model.get_image_features(px["pixel_values"], px["image_grid_thw"],
                                                          return_dict=True).pooler_output))
    mu, sigma = feats.mean(0), feats.std(0).clamp(min=1e-6)
    target = model.model.get_input_embeddings().weight.std(0).mean()
    last = model.model.visual.merger.mlp[-1]
    scale = target / sigma
    last.weight.mul_(scale[:, None])
    last.bias.copy_((last.bias - mu) * scale)


def thumbnail(image, size: int) -> Tensor:
    """An image as a ``size`` x ``size`` RGB grid in [-1, 1], flattened: what the tiny backbone's
    pretraining asks the last prompt token to reconstruct."""
    import numpy as np
    from PIL import Image

    small = image.convert("RGB").resize((size, size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).reshape(-1) / 127.5 - 1.0)


def _pretrain(model, tokenizer, image_processor, dataset, cfg: TinyConfig, seed: int, progress: bool) -> None:
    """Generic pretraining of the tiny backbone, all parameters, a few hundred steps, two terms:

    * captioning: next-token loss on the title given the item's image (image -> title); items
      without an image train on the title alone;
    * image reconstruction: a linear head (dropped afterwards) reads the prompt's last hidden state
      and regresses the image's thumbnail (MSE), so that the state a prompt ends on carries what the
      image shows — what a real VLM's pretraining gives it, and what captioning alone cannot teach
      where titles say nothing of the image (the synthetic domain plants them independently).

    "Vanilla" then means pretrained but not tuned for recommendation."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    items = dataset.items
    has_img = items["image"].notna().to_numpy() if "image" in items else np.zeros(len(items), bool)
    usable = np.flatnonzero(items["title"].notna().to_numpy())
    if usable.size == 0 or cfg.pretrain_steps <= 0:
        return
    rng = np.random.default_rng(seed)
    head = nn.Linear(cfg.hidden_size, 3 * cfg.thumbnail ** 2)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.pretrain_steps))
    markup = "<|vision_start|><|image_pad|><|vision_end|>"
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    cache: dict[int, tuple] = {}
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="tiny backbone pretraining", disable=not progress or None, leave=False)
    for _ in bar:
        batch = rng.choice(usable, size=min(cfg.pretrain_batch, usable.size), replace=False)
        texts, images, thumbs, with_image = [], [], [], []
        for k in batch:
            title = items["title"].iat[int(k)]
            if has_img[k]:
                if k not in cache:
                    with Image.open(items["image"].iat[int(k)]) as im:
                        rgb = im.convert("RGB")
                    cache[k] = (rgb, thumbnail(rgb, cfg.thumbnail))
                images.append(cache[k][0])
                thumbs.append(cache[k][1])
                user = f"{markup} Describe this item."
            else:
                user = "Describe this item."
            with_image.append(bool(has_img[k]))
            texts.append((tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                        add_generation_prompt=True), title + "<|im_end|>"))
        kw = {}
        if images:
            px = image_processor(images=images, return_tensors="pt")
            it = iter(int(t.prod()) // 4 for t in px["image_grid_thw"])
            texts = [(p.replace("<|image_pad|>", "<|image_pad|>" * next(it)) if "<|image_pad|>" in p else p, t)
                     for p, t in texts]
            kw = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
        enc = tokenizer([p + t for p, t in texts], return_tensors="pt", padding=True, padding_side="right")
        labels = enc["input_ids"].clone()
        prompt_len = torch.tensor([len(tokenizer(p)["input_ids"]) for p, _ in texts])
        for r, n in enumerate(prompt_len.tolist()):
            labels[r, :n] = -100
        labels[enc["attention_mask"] == 0] = -100
        if kw:
            kw["mm_token_type_ids"] = (enc["input_ids"] == pad_id).int()
        hidden = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False,
                             **kw).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        if thumbs:
            rows = torch.tensor(with_image)
            last = hidden[torch.arange(len(texts))[rows], prompt_len[rows] - 1]
            loss = loss + cfg.reconstruction_weight * nn.functional.mse_loss(head(last), torch.stack(thumbs))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
