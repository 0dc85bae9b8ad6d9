"""The Qwen2.5-VL vision tower's index tensors (rotary positions, window order, segment bounds)
worked out on the CPU, once per distinct image grid, instead of by the tower on the device (a loop
of small kernels and reads back to the host for every chunk of images)."""
from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.nn import functional as F

from .attention import prime_plan
from .transfer import to_device

_VISION_INDEX_FUNCTIONS = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")


def takes_vision_index_inputs(visual) -> bool:
    """Whether ``visual`` is a Qwen2.5-VL vision tower whose forward takes its index tensors
    precomputed (transformers 5 reads them from its keyword arguments, else computes them)."""
    mod = sys.modules.get(type(visual).__module__) if visual is not None else None
    return (mod is not None and all(hasattr(mod, name) for name in _VISION_INDEX_FUNCTIONS)
            and all(hasattr(visual, name) for name in ("window_size", "patch_size", "spatial_merge_size", "fullatt_block_indexes")))


def vision_index_inputs(visual, grid_thw: Tensor, device, pieces: dict | None = None) -> tuple[dict, dict]:
    """The Qwen2.5-VL vision tower's index tensors for the images ``grid_thw`` (on the CPU): rotary
    positions, window order, the bounds of images and of windows and their longest segments. Left
    to the tower on the device, they are a loop of small kernels per image and reads back to the
    host (device syncs) in every chunk of images. Here each distinct grid's pieces come from the
    modeling module's own functions on the CPU (remembered in ``pieces``, keyed by grid) and are
    joined with offsets, which gives the very values the tower computes for the whole list (tested);
    they go to ``device`` without waiting (:func:`~vlm2rec_lab.accel.transfer.to_device`).
    Returns (the forward's keyword arguments, the bounds on the CPU by name)."""
    mod = sys.modules[type(visual).__module__]
    merge = visual.spatial_merge_size
    per = []  # per image: (rotary positions, image segment lengths, window order, window segment lengths)
    for grid in grid_thw.tolist():
        key = tuple(int(x) for x in grid)
        piece = pieces.get(key) if pieces is not None else None
        if piece is None:
            one = torch.tensor([key])
            pos = mod.get_vision_position_ids(one, merge)
            cu, _ = mod.get_vision_attention_seqlens(one, visual.config)
            window, cu_window = mod.get_vision_window_index(one, spatial_merge_size=merge,
                                                            window_size=visual.window_size, patch_size=visual.patch_size)
            piece = (pos, cu.diff().to(torch.int32), window, cu_window.diff().to(torch.int32))
            if pieces is not None:
                pieces[key] = piece
        per.append(piece)
    starts = torch.tensor([0] + [len(piece[2]) for piece in per[:-1]]).cumsum(0)  # merged tokens before each image
    window = torch.cat([p[2] + s for p, s in zip(per, starts.tolist())])
    cu, cu_window = (F.pad(torch.cat([p[i] for p in per]).cumsum(0, dtype=torch.int32), (1, 0)) for i in (1, 3))
    longest = lambda c: int((c[1:] - c[:-1]).max()) if len(c) > 1 else 0  # noqa: E731
    kw = {"position_ids": to_device(torch.cat([p[0] for p in per]), device), "cu_seqlens": to_device(cu, device),
          "max_seqlen": longest(cu), "window_index": to_device(window, device),
          "cu_window_seqlens": to_device(cu_window, device), "max_window_seqlen": longest(cu_window)}
    return kw, {"cu_seqlens": cu, "cu_window_seqlens": cu_window}


class VisionIndexCache:
    """A backbone's remembered index pieces, by image grid (a few bytes of indices each)."""

    def __init__(self, limit: int = 4096):
        self.limit = limit  # distinct image sizes kept before the memo starts over
        self.pieces: dict[tuple, tuple] = {}

    def inputs(self, visual, grid_thw: Tensor, device) -> dict:
        """:func:`vision_index_inputs` for these grids on ``device``, with the attention plans of
        their segment bounds worked out on the CPU; {} where the tower does not take them."""
        if not takes_vision_index_inputs(visual) or not len(grid_thw):
            return {}
        if len(self.pieces) > self.limit:
            self.pieces.clear()
        kw, bounds = vision_index_inputs(visual, grid_thw.cpu(), device, self.pieces)
        for name in ("cu_seqlens", "cu_window_seqlens"):
            prime_plan(kw[name], bounds[name])
        return kw
