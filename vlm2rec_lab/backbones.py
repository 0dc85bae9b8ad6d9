"""Backbones: any Hugging Face VLM (or text-only LLM) by hub id or local path, and the embedded
default ``tiny`` — a Qwen2.5-VL-architecture model built locally, saved, and loaded back through the
very same ``from_pretrained`` path as a real one (DESIGN §2).

No torchvision: images go through the PIL image processor, and the prompt's image placeholders are
expanded here (the stock Qwen processor insists on a video processor that needs torchvision).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import MethodType

import torch
from torch import Tensor, nn

from .io import atomic_dir
from .prompts import IMAGE, prompt_words

log = logging.getLogger(__name__)



def cache_root() -> Path:
    """Where built backbones are kept: $VLM2REC_CACHE, else ~/.cache/vlm2rec_lab."""
    return Path(os.environ.get("VLM2REC_CACHE") or Path.home() / ".cache" / "vlm2rec_lab")

LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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
class Backbone:
    """A loaded backbone: the base model (no LM head), its tokenizer and (VLMs) image processor.

    ``forward`` returns the final layer's hidden states (after the final norm) for token ids, with
    image features either computed from ``pixel_values`` or given precomputed (the vision cache).
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
    mixed_precision: bool = True  # see compute(); off: PEFT's own forward and casting (the plain path)
    _fusion_cache: tuple | None = field(default=None, repr=False)  # (model, tuner layers, fused swaps, dropouts, per layer)
    _vision_memo: dict = field(default_factory=dict, repr=False)  # grid -> the vision tower's index pieces
    _computing: bool = field(default=False, repr=False)  # inside compute()
    _cast_off: bool = field(default=False, repr=False)  # PEFT's input casting off in the current compute()
    _checkpoint_every: int = field(default=1, repr=False)  # see enable_checkpointing
    _compiled_blocks: list = field(default_factory=list, repr=False)  # what compile_layers compiled

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
        template with the generation prompt appended (DESIGN §2, ours), unless ``chat_template`` is off."""
        text = prompt.replace(IMAGE, self.image_markup)
        if not self.chat_template or getattr(self.tokenizer, "chat_template", None) is None:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def tokens_per_image(self, grid_thw) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.merge_size ** 2)

    def prepare_pixels(self, images: list) -> tuple[Tensor, Tensor]:
        """PIL images -> (pixel_values, image_grid_thw) on the CPU, the pixels already in the model's
        dtype (half the bytes to hold and copy in bf16): the CPU half of :meth:`preprocess_images`,
        safe to run in a worker thread (the processor keeps no state between calls)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].to(self.dtype), out["image_grid_thw"]

    def preprocess_images(self, images: list) -> tuple[Tensor, Tensor]:
        """PIL images -> (pixel_values, image_grid_thw) on the model's device."""
        pixel_values, grid_thw = self.prepare_pixels(images)
        return pixel_values.to(self.device, self.dtype), grid_thw.to(self.device)

    def image_features(self, pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """Vision tower (+ merger) output per image: a list of (tokens_i, hidden) tensors. Give
        ``grid_thw`` on the CPU: for Qwen2.5-VL the tower's index tensors are then worked out there
        (:func:`vision_index_inputs`), and the tower runs without waiting for the device."""
        base = _unwrap(self.model)
        pre = self._vision_inputs(grid_thw)
        grid = grid_thw.cpu() if pre else grid_thw.to(self.device)
        with self.compute(autocast=False):
            return list(base.get_image_features(pixel_values, grid, return_dict=True, **pre).pooler_output)

    def _vision_inputs(self, grid_thw: Tensor) -> dict:
        """:func:`vision_index_inputs` for these grids on this device (each distinct grid's pieces
        remembered), with the attention plans of their segment bounds worked out on the CPU; {}
        where the tower does not take them."""
        from .accel.attention import prime_plan

        visual = getattr(_unwrap(self.model), "visual", None)
        if not takes_vision_index_inputs(visual) or not len(grid_thw):
            return {}
        if len(self._vision_memo) > 4096:  # (distinct image sizes; a few bytes of indices each)
            self._vision_memo.clear()
        kw, bounds = vision_index_inputs(visual, grid_thw.cpu(), self.device, self._vision_memo)
        for name in ("cu_seqlens", "cu_window_seqlens"):
            prime_plan(kw[name], bounds[name])
        return kw

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
        with self.compute():
            return self.model(**kw).last_hidden_state

    def enable_checkpointing(self, every: int = 1) -> None:
        """Recompute the activations of every ``every``-th decoder layer of the language model in the
        backward pass instead of keeping them (non-reentrant): less memory for about a third more
        compute in those layers (``every`` > 1 trades part of the saving back for speed). Each
        recomputation runs in the state its forward ran in (:meth:`_checkpoint_contexts`), so packed
        forwards, shared prefixes and the compute path's stand-ins work with checkpointing too.
        (Hugging Face's ``activation_checkpointing_enable`` on the model does not set that up: a
        packed forward's backward then fails with a ``CheckpointError``.)"""
        from torch.utils.checkpoint import checkpoint

        if every < 1:
            raise ValueError(f"checkpoint every {every}-th layer: need at least 1")
        for i, layer in enumerate(self.decoder_layers()):
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False,
                                                         context_fn=partial(self._checkpoint_contexts, layer))
            layer.gradient_checkpointing = i % every == 0
        self._checkpoint_every = every

    @property
    def checkpoint_every(self) -> int:
        """Every how many decoder layers one is checkpointed (:meth:`enable_checkpointing`); 0: off.
        (Read from the layers, should something else have switched their checkpointing.)"""
        flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in self.decoder_layers()]
        if not any(flags):
            return 0
        if flags == [i % self._checkpoint_every == 0 for i in range(len(flags))]:
            return self._checkpoint_every
        on = [i for i, f in enumerate(flags) if f]
        return on[1] - on[0] if len(on) > 1 else len(flags)

    def decoder_layers(self) -> list[nn.Module]:
        """The language model's decoder layers."""
        base = _unwrap(self.model)
        lm = getattr(base, "language_model", None) or getattr(base, "model", base)
        layers = list(getattr(lm, "layers", None) or [])
        if not layers:
            raise ValueError(f"{self.name}: no decoder layers found")
        return layers

    def _checkpoint_contexts(self, layer: nn.Module) -> tuple:
        """``torch.utils.checkpoint``'s ``context_fn`` for ``layer``, called as its forward starts:
        the forward runs as it is; its recomputation in the backward pass (outside :meth:`compute`
        and the packed forward by then) re-enters the state this forward runs in — the compute path's
        stand-ins within the layer, with PEFT's input casting as it is now, and the packed attention
        with its shared prefixes. Checkpointing itself restores autocast and the random state, so
        the recomputation draws the same dropout masks."""
        from .accel.attention import packed_state

        return nullcontext(), _Replay(self, layer, self._computing, self._cast_off, packed_state())

    @property
    def dropout_active(self) -> bool:
        """Whether a forward now draws dropout masks (a dropout layer with p > 0 in training mode,
        e.g. LoRA's dropout while training)."""
        return any(m.training and m.p > 0 for m in self._fusion()[2])

    @property
    def can_pack(self) -> bool:
        """Whether :meth:`forward_packed` works: Qwen2-VL-family VLMs (multimodal rotary positions
        from ``get_rope_index``, attention through transformers' interface)."""
        base = _unwrap(self.model)
        return self.kind == "vlm" and hasattr(base, "get_rope_index")

    def rope_positions(self, input_ids: Tensor, attention_mask: Tensor, image_grid_thw: Tensor | None) -> list[Tensor]:
        """Per row of a (left- or right-) padded batch: the (3, length) multimodal rotary positions of
        its real tokens — the model's own ``get_rope_index`` for prompts with images, 0..length-1 for
        text-only ones (a padded forward offsets those by the padding, which rotary attention,
        depending only on relative positions, does not see)."""
        rows = attention_mask.bool()
        if image_grid_thw is None or not len(image_grid_thw):
            return [torch.arange(int(m.sum()), device=input_ids.device).expand(3, -1) for m in rows]
        pos, _ = _unwrap(self.model).get_rope_index(input_ids, mm_token_type_ids=(input_ids == self.image_token_id).int(),
                                                    image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return [pos[:, r, m] for r, m in enumerate(rows)]

    def forward_packed(self, sequences: list[Tensor], positions: list[Tensor],
                       image_features: list[Tensor] | None = None, prefix_groups: list | None = None) -> Tensor:
        """Many prompts in one forward, packed into one row without padding: ``sequences`` of token
        ids, their (3, length) rotary ``positions`` and the image features in the order their image
        tokens appear. Attention stays within each sequence (causal, :mod:`vlm2rec_lab.accel.attention`).
        With ``prefix_groups`` (a label per sequence, e.g. its prompt kind), the leading tokens that
        a group's prompts share (chat template, prompt head; never image tokens) are computed once
        and attended to by each prompt's rest (:func:`~vlm2rec_lab.accel.attention.shared_prefixes`).
        Returns (n, d): the final hidden state at each sequence's last token — the same numbers as
        padded batches up to float rounding, with one launch per operator instead of one per batch."""
        from .accel.attention import packed_language_model, prime_plan, shared_prefixes
        from .accel.transfer import to_device

        prefix_of, skip = None, 0
        if prefix_groups is not None:
            stop = tuple(int(t) for t in (self.image_token_id, getattr(self.base_config, "video_token_id", None))
                         if t is not None)
            sequences, positions, prefix_of, skip = shared_prefixes(sequences, positions, prefix_groups, stop)
            if not skip:
                prefix_of = None
        # the layout goes over without waiting for the device (asynchronous copies through pinned memory,
        # the attention plan worked out on the CPU): no device sync in the language model's layers
        lengths = torch.tensor([len(x) for x in sequences])
        bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        cu = to_device(bounds, self.device)
        prime_plan(cu, bounds, prefix_of)
        ids = to_device(torch.cat(list(sequences)), self.device)[None]
        kw: dict = {"input_ids": ids, "use_cache": False, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                    "position_ids": to_device(torch.cat(list(positions), dim=1)[:, None], self.device),
                    "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
        if image_features:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(image_features))}
        rows = to_device(bounds[1 + skip:].long() - 1, self.device)  # each prompt's last token
        with self.compute(), packed_language_model(self.model, prefix_of, rows):
            hidden = self.model(**kw).last_hidden_state[0]
        return hidden[rows]

    def compile_layers(self, backend: str = "inductor", vision: bool = False, retained_backward: bool = False) -> int:
        """``torch.compile`` each decoder layer of the language model in place (dynamic shapes, so
        packed steps of varying length reuse the graphs), and with ``vision`` each vision block too:
        fuses the elementwise work around the matrix products (norms, rotary, SiLU, LoRA scaling).
        The vision tower then attends through the varlen function (as it does on a GPU anyway):
        its per-segment path is a Python loop over the images that a compiled block unrolls,
        one graph per image count. ``retained_backward``: a graph's backward may run more than once
        (``retain_graph=True``, as the gradient-cosine probe's gradient passes do), which
        AOTAutograd's donated buffers forbid: they are turned off, process-wide
        (``torch._functorch.config.donated_buffer``), for the graphs compiled from then on. Call
        after LoRA is applied. Returns the number of blocks compiled."""
        from .accel.attention import set_vision_attention

        if retained_backward:
            import torch._functorch.config

            if hasattr(torch._functorch.config, "donated_buffer"):  # (torch 2.5+)
                torch._functorch.config.donated_buffer = False

        base = _unwrap(self.model)
        layers = self.decoder_layers()
        if vision:
            visual = getattr(base, "visual", None)
            if visual is None:
                raise ValueError(f"{self.name}: no vision tower to compile")
            set_vision_attention(self.model, varlen=True)
            layers += list(visual.blocks)
        for layer in layers:
            layer.compile(backend=backend, dynamic=True)
            self._compiled_blocks.append(layer)
        return len(layers)

    def uncompile_layers(self) -> int:
        """The blocks :meth:`compile_layers` compiled run their own forward again (the vision
        attention's setting and the donated buffers stay as it left them). Returns how many."""
        compiled, self._compiled_blocks = self._compiled_blocks, []
        for b in compiled:
            b._compiled_call_impl = None  # (what nn.Module.compile set; __call__ then takes the module's own path)
        return len(compiled)

    @contextmanager
    def compute(self, autocast: bool = True):
        """The project's compute path around a forward: fused stand-ins for LoRA layers (the update
        added inside one matrix product), RMSNorms (one kernel) and the vision tower's patch embedding
        (a GEMM, not a Conv3d), :mod:`vlm2rec_lab.accel.fused`; and,
        where a low-precision model runs on a GPU (and ``autocast``), autocast to its dtype with
        PEFT's input casting off, so LoRA's small matrices take bf16 activations as they are (fp32
        master weights kept) instead of copying every activation to fp32 and back (on an H100, a 3B
        training step took 0.850 s with those copies and 0.734 s without, and 15 GiB less). Off with
        ``mixed_precision=False`` (the plain Hugging Face / PEFT path). A layer's recomputation under
        checkpointing re-enters it (:meth:`_checkpoint_contexts`)."""
        if self._computing or not self.mixed_precision:
            yield  # (nested: the outer context has set things up)
            return
        autocast = autocast and self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
        self._cast_off = autocast
        with self._stand_ins(cast_off=autocast):
            if autocast:
                with torch.autocast("cuda", dtype=self.dtype):
                    yield
            else:
                yield

    @contextmanager
    def merged_adapters(self, budget_bytes: int | None = None):
        """For forwards without gradients inside: each plain LoRA layer whose dropout draws no masks
        computes with its update merged into the weight, ``W + s·B·A`` made once on entry
        (:func:`~vlm2rec_lab.accel.fused.merged_weight`) and dropped on exit; the layer's own weights are
        never touched. The adapters must not change inside. Forwards that want a gradient, and
        layers that stop merging (training mode with dropout, adapters switched), keep the fused
        LoRA forward. The merged weights take as much memory as the adapted base weights (5.2 GiB
        in bf16 for a 3B model): where that does not fit in ``budget_bytes`` (default: on a CUDA
        device, its free memory less 4 GiB for the forwards; on other devices no limit) nothing is
        merged (:meth:`Encoder.embed_many` also goes on unmerged where a batch then runs out of
        memory). Off on the plain path (``mixed_precision=False``). Yields the number of layers
        merged."""
        from .accel.fused import MERGED, fused_forward, merged_forward, merged_weight, mergeable

        cached = None
        if self.mixed_precision and not self._computing:
            self._fusion()
            cached = self._fusion_cache
        swaps = cached[2] if cached else []
        picked = [k for k, (m, f) in enumerate(swaps) if f.__func__ is fused_forward and mergeable(m)]
        need = sum(swaps[k][0].get_base_layer().weight.nbytes for k in picked)
        if budget_bytes is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget_bytes = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device) - 4 * 2**30
        if not picked or (budget_bytes is not None and need > budget_bytes):
            if picked:
                log.info("%s: adapters not merged for embedding: %.1f GiB needed, %.1f GiB to spare",
                         self.name, need / 2**30, max(budget_bytes, 0) / 2**30)
            yield 0
            return
        before = {k: swaps[k] for k in picked}
        try:
            for k in picked:
                m = swaps[k][0]
                m.__dict__[MERGED] = merged_weight(m)
                swaps[k] = (m, MethodType(merged_forward, m))
            cached[4].clear()  # (per-layer subsets of the swaps, for checkpointed layers)
            yield len(picked)
        finally:
            for k, pair in before.items():
                swaps[k] = pair
                pair[0].__dict__.pop(MERGED, None)
            cached[4].clear()

    @contextmanager
    def _stand_ins(self, cast_off: bool, within: nn.Module | None = None):
        """The fused stand-ins swapped in (for the modules inside ``within``, or all), and with
        ``cast_off`` PEFT's input casting off; everything put back afterwards."""
        tuners, swaps, _ = self._fusion()
        if within is not None:
            per_layer = self._fusion_cache[4]
            if id(within) not in per_layer:
                inside = set(map(id, within.modules()))
                per_layer[id(within)] = ([m for m in tuners if id(m) in inside], [(m, f) for m, f in swaps if id(m) in inside])
            tuners, swaps = per_layer[id(within)]
        saved = [m.__dict__.get("forward") for m, _ in swaps]  # a hook's own forward, say: put back after
        for m, f in swaps:
            m.forward = f
        if cast_off:
            for m in tuners:
                m.cast_input_dtype_enabled = False
        self._computing = True
        try:
            yield
        finally:
            self._computing = False
            for (m, _), before in zip(swaps, saved):
                if before is None:
                    del m.forward
                else:
                    m.forward = before
            for m in tuners:
                m.cast_input_dtype_enabled = True

    def _fusion(self) -> tuple[list, list, list]:
        """The model's PEFT tuner layers, the (module, fused forward) swaps of
        :func:`~vlm2rec_lab.accel.fused.fused_forwards` and the model's dropout layers, found once per model."""
        cached = self._fusion_cache
        if cached is None or cached[0] is not self.model:
            from peft.tuners.tuners_utils import BaseTunerLayer

            from .accel.fused import fused_forwards, read_rows_forward

            tuners = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
            dropouts = [m for m in self.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
            swaps = fused_forwards(self.model)
            last = self.decoder_layers()[-1] if self.can_pack else None
            if isinstance(getattr(last, "mlp", None), nn.Module):  # packed forwards read a few final hidden states
                swaps.append((last.mlp, MethodType(read_rows_forward, last.mlp)))
            cached = (self.model, tuners, swaps, dropouts, {})  # (+ per layer, see _stand_ins)
            self._fusion_cache = cached
        return cached[1], cached[2], cached[3]


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is the device running out of memory (some kernels report it as a plain
    RuntimeError, e.g. cuBLAS failing to allocate its workspace)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def _unwrap(model: nn.Module) -> nn.Module:
    """The base model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class _Replay:
    """The state a checkpointed layer's forward ran in, re-entered around each recomputation of it
    (see ``Backbone._checkpoint_contexts``). Re-enterable: a layer is recomputed once per backward
    pass through it, three times in a step with the gradient-cosine probe (two gradient passes that
    keep the graph, then the step's backward)."""

    def __init__(self, bb: Backbone, layer: nn.Module, computing: bool, cast_off: bool, packed: tuple | None):
        self.bb, self.layer, self.computing, self.cast_off, self.packed = bb, layer, computing, cast_off, packed
        self._open: list[ExitStack] = []

    def __enter__(self):
        from .accel.attention import packed_language_model, packed_state

        stack = ExitStack()
        try:
            if self.computing and not self.bb._computing:
                stack.enter_context(self.bb._stand_ins(self.cast_off, within=self.layer))
            if self.packed is not None and packed_state() is None:
                stack.enter_context(packed_language_model(*self.packed))
        except BaseException:
            stack.close()
            raise
        self._open.append(stack)
        return self

    def __exit__(self, *exc) -> bool:
        return self._open.pop().__exit__(*exc)


_VISION_INDEX_FUNCTIONS = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")


def takes_vision_index_inputs(visual) -> bool:
    """Whether ``visual`` is a Qwen2.5-VL vision tower whose forward takes its index tensors
    precomputed (transformers 5 reads them from its keyword arguments, else computes them)."""
    import sys

    mod = sys.modules.get(type(visual).__module__) if visual is not None else None
    return (mod is not None and all(hasattr(mod, f) for f in _VISION_INDEX_FUNCTIONS)
            and all(hasattr(visual, a) for a in ("window_size", "patch_size", "spatial_merge_size", "fullatt_block_indexes")))


def vision_index_inputs(visual, grid_thw: Tensor, device, pieces: dict | None = None) -> tuple[dict, dict]:
    """The Qwen2.5-VL vision tower's index tensors for the images ``grid_thw`` (on the CPU): rotary
    positions, window order, the bounds of images and of windows and their longest segments. Left
    to the tower on the device, they are a loop of small kernels per image and reads back to the
    host (device syncs) in every chunk of images. Here each distinct grid's pieces come from the
    modeling module's own functions on the CPU (remembered in ``pieces``, keyed by grid) and are
    joined with offsets, which gives the very values the tower computes for the whole list (tested);
    they go to ``device`` without waiting (:func:`~vlm2rec_lab.accel.transfer.to_device`).
    Returns (the forward's keyword arguments, the bounds on the CPU by name)."""
    import sys

    from torch.nn import functional as F

    from .accel.transfer import to_device

    mod = sys.modules[type(visual).__module__]
    m = visual.spatial_merge_size
    per = []
    for g in grid_thw.tolist():
        key = tuple(int(x) for x in g)
        p = pieces.get(key) if pieces is not None else None
        if p is None:
            one = torch.tensor([key])
            pos = mod.get_vision_position_ids(one, m)
            cu, _ = mod.get_vision_attention_seqlens(one, visual.config)
            window, cu_window = mod.get_vision_window_index(one, spatial_merge_size=m, window_size=visual.window_size,
                                                            patch_size=visual.patch_size)
            p = (pos, cu.diff().to(torch.int32), window, cu_window.diff().to(torch.int32))  # (segment lengths)
            if pieces is not None:
                pieces[key] = p
        per.append(p)
    starts = torch.tensor([0] + [len(p[2]) for p in per[:-1]]).cumsum(0)  # merged tokens before each image
    window = torch.cat([p[2] + s for p, s in zip(per, starts.tolist())])
    cu, cu_window = (F.pad(torch.cat([p[i] for p in per]).cumsum(0, dtype=torch.int32), (1, 0)) for i in (1, 3))
    longest = lambda c: int((c[1:] - c[:-1]).max()) if len(c) > 1 else 0  # noqa: E731
    kw = {"position_ids": to_device(torch.cat([p[0] for p in per]), device), "cu_seqlens": to_device(cu, device),
          "max_seqlen": longest(cu), "window_index": to_device(window, device),
          "cu_window_seqlens": to_device(cu_window, device), "max_window_seqlen": longest(cu_window)}
    return kw, {"cu_seqlens": cu, "cu_window_seqlens": cu_window}


def lora_target_regex(kind: str) -> str:
    """LoRA targets: the language model's projections only. In Qwen2.5-VL the bare names also match
    the vision tower's MLPs, hence the ``language_model`` anchor for VLMs (DESIGN §2)."""
    names = "|".join(LORA_PROJECTIONS)
    return rf".*language_model.*\.({names})$" if kind == "vlm" else rf".*\.({names})$"


def default_device() -> torch.device:
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
    mine = torch.device("cuda", torch.cuda.current_device())
    if device.index is not None and device.index != mine.index and dist.is_distributed():
        import warnings

        warnings.warn(f"device {device} in process {dist.rank()} of {dist.world_size()}: each process computes on the "
                      f"GPU of its local rank, here {mine} (--device cuda says so without naming one)",
                      RuntimeWarning, stacklevel=2)
        return mine
    return mine if device.index is None else device


def load_backbone(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  chat_template: bool = True, dataset=None, cache_dir: str | Path | None = None,
                  seed: int = 0, max_pixels: int | None = None) -> Backbone:
    """Load a backbone by hub id or local path; ``tiny`` builds (once, cached) the embedded default
    for ``dataset``. bf16 on GPU, fp32 on CPU unless ``dtype`` says otherwise."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoTokenizer

    device = backbone_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = str(_tiny_once(dataset, seed, cache_dir)) if name_or_path == "tiny" else name_or_path
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


# --------------------------------------------------------------------------- the embedded default


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
        half = self.hidden_size // self.heads // 2  # must sum to head_dim / 2
        a = half // 4
        return [half - 2 * ((half - a) // 2), (half - a) // 2, (half - a) // 2]


def _train_tokenizer(texts: list[str], vocab_size: int):
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


def _tiny_once(dataset, seed: int, cache_dir) -> Path:
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
    tokenizer = _train_tokenizer(titles + prompt_words() + ["Describe this item."], cfg.vocab_size)
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
