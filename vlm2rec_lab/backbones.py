"""Backbones: any Hugging Face VLM (or text-only LLM) by hub id or local path, or the embedded
default ``tiny`` (:mod:`~vlm2rec_lab.tiny`), loaded through ``from_pretrained`` either way (docs/method.md §1).
:meth:`Backbone.embed` turns tokenized prompts into last-token embeddings; how fast (packing,
fused stand-ins, compiling) is the business of :mod:`~vlm2rec_lab.accel`, switched by
:class:`~vlm2rec_lab.config.SpeedConfig`.

No torchvision: images go through the PIL image processor, and the prompt's image placeholders are
expanded by the caller (the stock Qwen processor insists on a video processor that needs torchvision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .accel.engine import SpeedEngine
from .accel.vision_index import VisionIndexCache
from .prompts import IMAGE

LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Prompts(NamedTuple):
    """One set of prompts of one kind, tokenized (left-padded) on the CPU, with their images as
    cached features or as pixels (on the device)."""

    kind: str  # prompt kind ("T", "V", "I"; the shared-prefix group of packed forwards)
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    image_grid_thw: Tensor | None  # (n_images, 3)
    pixel_values: Tensor | None
    image_features: list[Tensor] | None  # per image (tokens_i, d)


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, d), (B, L) -> (B, d): the hidden state at each row's last non-padding token,
    correct for left and right padding alike."""
    L = attention_mask.shape[1]
    last = L - 1 - attention_mask.flip(1).long().argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class Backbone:
    """A loaded backbone: the base model (no LM head), its tokenizer and (VLMs) image processor.

    ``forward`` returns the final layer's hidden states (after the final norm) for token ids, with
    image features either computed from ``pixel_values`` or given precomputed (the vision cache);
    ``embed`` the hidden state at each prompt's last token (docs/method.md §1).
    """

    name: str
    model: nn.Module  # e.g. Qwen2_5_VLModel; LoRA wraps it in place
    tokenizer: object
    image_processor: object | None
    kind: str  # "vlm" or "llm"
    chat_template: bool = True
    image_token: str = "<|image_pad|>"
    image_markup: str = "<|vision_start|><|image_pad|><|vision_end|>"
    merge_size: int = 2
    info: dict = field(default_factory=dict)
    engine: SpeedEngine = field(init=False, repr=False, compare=False)  # the compute path (accel.engine)
    vision_index: VisionIndexCache = field(default_factory=VisionIndexCache, repr=False, compare=False)

    def __post_init__(self):
        self.engine = SpeedEngine(self)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        cfg = self.base_config
        return int(getattr(getattr(cfg, "text_config", cfg), "hidden_size"))

    @property
    def base_config(self):
        m = self.model
        return getattr(m, "config", None) or m.get_base_model().config

    @property
    def image_token_id(self) -> int:
        tid = getattr(self.base_config, "image_token_id", None)
        return int(tid) if tid is not None else int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    def render(self, prompt: str) -> str:
        """Prompt string -> model input string: images as vision markup, the user turn of the chat
        template with the generation prompt appended (docs/method.md §1, ours), unless ``chat_template`` is off."""
        text = prompt.replace(IMAGE, self.image_markup)
        if not self.chat_template or getattr(self.tokenizer, "chat_template", None) is None:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def tokens_per_image(self, grid_thw) -> int:
        """Visual tokens of one image after the merger: t·h·w / merge_size²."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.merge_size ** 2)

    def prepare_pixels(self, images: list) -> tuple[Tensor, Tensor]:
        """PIL images -> (pixel_values, image_grid_thw) on the CPU, the pixels already in the model's
        dtype: the CPU half of :meth:`preprocess_images`, safe to run in a worker thread (the
        processor keeps no state between calls)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].to(self.dtype), out["image_grid_thw"]

    def preprocess_images(self, images: list) -> tuple[Tensor, Tensor]:
        """PIL images -> (pixel_values, image_grid_thw) on the model's device."""
        pixel_values, grid_thw = self.prepare_pixels(images)
        return pixel_values.to(self.device, self.dtype), grid_thw.to(self.device)

    def image_features(self, pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """Vision tower (+ merger) output per image: a list of (tokens_i, hidden) tensors. Give
        ``grid_thw`` on the CPU: for Qwen2.5-VL the tower's index tensors are then worked out there
        (:mod:`~vlm2rec_lab.accel.vision_index`), and the tower runs without waiting for the device."""
        base = unwrap(self.model)
        pre = self.vision_index.inputs(getattr(base, "visual", None), grid_thw, self.device)
        grid = grid_thw.cpu() if pre else grid_thw.to(self.device)
        with self.engine.compute(autocast=False):
            return list(base.get_image_features(pixel_values, grid, return_dict=True, **pre).pooler_output)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_grid_thw: Tensor | None = None,
                pixel_values: Tensor | None = None, image_features: list[Tensor] | None = None) -> Tensor:
        """(B, L) ids -> (B, L, d) final hidden states. Multimodal rotary positions need
        ``mm_token_type_ids`` in Qwen2.5-VL (else it silently falls back to 1-D positions): built here."""
        kw: dict = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.kind == "vlm" and image_grid_thw is not None and len(image_grid_thw):
            kw["image_grid_thw"] = image_grid_thw
            kw["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
            if image_features is not None:
                from transformers.modeling_outputs import BaseModelOutputWithPooling

                kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(image_features))}
            else:
                kw["pixel_values"] = pixel_values
        with self.engine.compute():
            return self.model(**kw).last_hidden_state

    def embed(self, prompt_sets: Sequence[Prompts] | None, layout=None, share_prefix: bool | None = None,
              forward_groups: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
        """Prompt sets -> their (B_k, d) float32 embeddings: the final hidden state at each prompt's
        last token (docs/method.md §1). Given their ``layout`` (:meth:`layout`), one forward over all
        prompts packed without padding (:mod:`~vlm2rec_lab.accel.packing`; ``share_prefix``,
        ``forward_groups``: see :func:`~vlm2rec_lab.accel.packing.embed_layout`); otherwise the
        plain path, one padded forward per set. Both give the same embeddings up to float rounding
        (tested)."""
        from .accel import packing

        if layout is not None:
            return packing.embed_layout(self, layout, share_prefix, forward_groups)
        return [self._embed_padded(p) for p in prompt_sets]

    @property
    def can_pack(self) -> bool:
        """Whether :meth:`layout` works for this model (:func:`~vlm2rec_lab.accel.packing.can_pack`)."""
        from .accel import packing

        return packing.can_pack(self)

    def layout(self, prompt_sets: Sequence[Prompts]):
        """The packed forward's inputs for ``prompt_sets``, laid out on the CPU
        (:func:`~vlm2rec_lab.accel.packing.layout`)."""
        from .accel import packing

        return packing.layout(self, prompt_sets)

    def _embed_padded(self, p: Prompts) -> Tensor:
        """One padded forward for a prompt set -> (B, d)."""
        device = self.device
        mask = p.attention_mask.to(device)
        grid = None if p.image_grid_thw is None else p.image_grid_thw.to(device)
        hidden = self.forward(p.input_ids.to(device), mask, grid, p.pixel_values, p.image_features)
        return last_token_pool(hidden, mask).float()

    def decoder_layers(self) -> list[nn.Module]:
        """The language model's decoder layers."""
        base = unwrap(self.model)
        lm = getattr(base, "language_model", None) or getattr(base, "model", base)
        layers = list(getattr(lm, "layers", None) or [])
        if not layers:
            raise ValueError(f"{self.name}: no decoder layers found")
        return layers


def unwrap(model: nn.Module) -> nn.Module:
    """The base model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def lora_target_regex(kind: str) -> str:
    """LoRA targets: the language model's projections only. In Qwen2.5-VL the bare names also match
    the vision tower's MLPs, hence the ``language_model`` anchor for VLMs (docs/method.md §1)."""
    names = "|".join(LORA_PROJECTIONS)
    return rf".*language_model.*\.({names})$" if kind == "vlm" else rf".*\.({names})$"


def default_device() -> torch.device:
    """A GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backbone_device(device: str | torch.device | None) -> torch.device:
    """``device`` (None: :func:`default_device`) made concrete: a bare ``cuda`` is this process's
    current GPU, which under torchrun or accelerate is the GPU of its local rank. There, another
    GPU named (``--device cuda:0``, or a run's config written by a one-GPU run) is replaced by the
    local rank's, with a warning: every process computing on that one GPU is never what is meant."""
    from .accel import distributed as dist

    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    local = dist.local_rank()
    if dist.is_distributed() and local >= torch.cuda.device_count():
        raise ValueError(f"process {dist.rank()} of {dist.world_size()} has local rank {local} but this machine has "
                         f"{torch.cuda.device_count()} GPU(s): start one process a GPU, or pass --device cpu")
    own = torch.device("cuda", torch.cuda.current_device())  # the local rank's GPU
    if device.index is not None and device.index != own.index and dist.is_distributed():
        import warnings

        warnings.warn(f"device {device} in process {dist.rank()} of {dist.world_size()}: each process computes on the "
                      f"GPU of its local rank, here {own} (--device cuda says so without naming one)",
                      RuntimeWarning, stacklevel=2)
        return own
    return own if device.index is None else device


def load_backbone(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  chat_template: bool = True, dataset=None, cache_dir: str | Path | None = None,
                  seed: int = 0, max_pixels: int | None = None) -> Backbone:
    """Load a backbone by hub id or local path; ``tiny`` builds (once, cached) the embedded default
    for ``dataset`` (:func:`~vlm2rec_lab.tiny.build_tiny`). bf16 on GPU, fp32 on CPU unless
    ``dtype`` says otherwise."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoTokenizer

    device = backbone_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name_or_path == "tiny":
        from .tiny import build_tiny_once

        path = str(build_tiny_once(dataset, seed, cache_dir))
    else:
        path = name_or_path
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if hasattr(config, "vision_config"):
        full = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        model = full.model  # the base model: no language-model head
        image_processor = _image_processor(path, max_pixels)
        kind = "vlm"
        merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
    else:
        model = AutoModel.from_pretrained(path, dtype=dtype)
        image_processor, kind, merge = None, "llm", 1
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "vlm" and device.type == "cuda":  # one batched SDPA per window size (the same attention)
        from .accel.attention import set_vision_attention

        set_vision_attention(model, varlen=True)
    return Backbone(name=name_or_path, model=model, tokenizer=tokenizer, image_processor=image_processor,
                    kind=kind, chat_template=chat_template, merge_size=merge,
                    info={"path": path, "model_type": config.model_type, "dtype": str(dtype)})


def _image_processor(path: str, max_pixels: int | None):
    """The PIL image processor (torchvision is never needed); ``max_pixels`` overrides its size
    policy's largest image (Qwen's processors take it as ``size["longest_edge"]``, in pixels)."""
    from transformers import AutoImageProcessor

    kw = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    try:
        proc = AutoImageProcessor.from_pretrained(path, backend="pil", **kw)
    except (TypeError, ValueError):
        proc = AutoImageProcessor.from_pretrained(path, **kw)
    try:
        got = proc.size["longest_edge"]
    except (AttributeError, KeyError, TypeError):
        got = None
    if max_pixels is not None and got != max_pixels:
        raise ValueError(f"{path}: the image processor ({type(proc).__name__}) did not take max_pixels={max_pixels}")
    return proc

