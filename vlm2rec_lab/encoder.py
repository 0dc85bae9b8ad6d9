"""Embeddings from a backbone (docs/method.md §1): prompts -> last-token final-layer hidden state.

External fusion: z = z^T + z^V, e = e^T + e^V (Eq. 2); internal fusion embeds one interleaved
prompt. With the vision tower frozen (always: LoRA goes on the language model only), each image's
vision features are a pure function of the image, so they are computed once and cached; the cached
path gives the same embeddings as the uncached one (tested).
"""
from __future__ import annotations

from contextlib import closing
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .accel.prefetch import default_workers, ordered_map
from .backbones import Backbone, Prompts
from .config import SpeedConfig
from .data.images import ImageStore
from .prompts import sequence_prompt



class Encoder:
    """Embeds items and histories of one dataset with one backbone.

    Args:
        backbone: a loaded :class:`~vlm2rec_lab.backbones.Backbone`.
        items: the dataset's items table (``title``, ``image``, ``item_id`` by ``item_idx``).
        speed: the speed switches it embeds with (:class:`~vlm2rec_lab.config.SpeedConfig`):
            ``cache_vision`` reuses per-image vision features (valid while the vision tower is
            frozen); ``packed``: :meth:`layout` packs the prompts of a forward, ``share_prefix``
            goes with them to :meth:`Backbone.embed`; ``fused`` is set on the backbone's engine
            (:class:`~vlm2rec_lab.accel.engine.SpeedEngine`: stand-ins, autocast, merged adapters);
            ``image_workers`` threads read, decode and preprocess images ahead of the vision tower
            (:mod:`~vlm2rec_lab.accel.prefetch`); ``merge_adapters``: :meth:`embed_many` computes
            with each LoRA update merged into its weight (no gradients there, no dropout in
            evaluation mode).
        images: image store (size policy); default one with the backbone's processor doing the sizing.
        batch_size: prompts per forward when embedding without gradients.
    """

    def __init__(self, backbone: Backbone, items, speed: SpeedConfig | None = None, images: ImageStore | None = None,
                 batch_size: int = 128):
        self.backbone = backbone
        self.speed = speed = speed or SpeedConfig()
        backbone.engine.fused = speed.fused
        self.image_workers = default_workers() if speed.image_workers is None else speed.image_workers
        titles = items["title"].tolist()
        ids = items["item_id"].astype(str).tolist()
        # items without a title (text-less data) are named by their id in text prompts (ours)
        self.titles = [t if isinstance(t, str) and t else i for t, i in zip(titles, ids)]
        paths = items["image"].tolist() if "image" in items else [None] * len(ids)
        self.image_paths = [p if isinstance(p, str) and p else None for p in paths]
        self.store = images or ImageStore(max_pixels=10**9)
        self.batch_size = batch_size
        self.features: dict[int, tuple[Tensor, Tensor]] = {}  # the vision cache: item_idx -> (features, grid)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    # ---------------------------------------------------------------- vision
    def _load_image(self, i: int):
        path = self.image_paths[i]
        try:
            return self.store.load(path)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for unreadable files
            raise ValueError(f"{path}: the image of item_idx {i} cannot be read ({type(e).__name__}: {e})") from e

    def _check_images(self, idx: Sequence[int]) -> None:
        if self.backbone.kind != "vlm":
            raise ValueError(f"{self.backbone.name} is a text-only model: no image prompts")
        missing = [i for i in idx if not self.image_paths[i]]
        if missing:
            raise ValueError(f"{len(missing)} item(s) have no image (e.g. item_idx {missing[:5]}); "
                             f"image prompts need a dataset prepared with images")

    def _load_images(self, idx: Sequence[int]) -> list:
        """The images of ``idx``, read by ``image_workers`` threads."""
        self._check_images(idx)
        return list(ordered_map(self._load_image, idx, self.image_workers if len(idx) > 1 else 0, max_pending=len(idx)))

    def pixels_of(self, i: int) -> tuple[Tensor, Tensor]:
        """One image's pixels (in the model's dtype) and grid, on the CPU: runs in a worker thread."""
        return self.backbone.prepare_pixels([self._load_image(i)])

    def vision_features(self, idx: Sequence[int], chunk: int = 64, progress: bool = False) -> tuple[list[Tensor], Tensor]:
        """Features and grids for items ``idx`` (repeats allowed), through the cache. Images not yet
        cached go through the vision tower ``chunk`` at a time, while ``image_workers`` threads read
        and preprocess the images of the next chunk (at most two chunks' pixels held at once)."""
        if not self.speed.cache_vision:
            raise RuntimeError("vision cache is disabled")
        from tqdm.auto import tqdm

        todo = sorted({int(i) for i in idx} - self.features.keys())
        self._check_images(todo)
        bar = tqdm(total=len(todo), desc="vision features", unit="img", disable=not progress or None, leave=False)
        with closing(ordered_map(self.pixels_of, todo, self.image_workers, max_pending=2 * chunk)) as stream:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                got = [next(stream) for _ in part]
                px, grid = torch.cat([p for p, _ in got]), torch.cat([g for _, g in got])
                # ordinary (not inference-mode) tensors, even under embed_many: training forwards reuse the cache
                with torch.inference_mode(False), torch.no_grad():
                    feats = self.backbone.image_features(px.to(self.backbone.device, self.backbone.dtype), grid)  # (grids stay on the CPU)
                    for i, f, g in zip(part, feats, grid):
                        self.features[i] = (f.detach().clone(), g.clone())
                bar.update(len(part))
        bar.close()
        feats = [self.features[int(i)][0] for i in idx]
        grid = torch.stack([self.features[int(i)][1] for i in idx]) if len(idx) else None
        return feats, grid

    def cache_all(self, progress: bool = False) -> None:
        """Compute the vision features of every item with an image (e.g. before training). Under a
        launcher each process reads and runs through the vision tower its share of the images
        (:func:`~vlm2rec_lab.accel.distributed.shard`) and the features are gathered, so that every
        process holds them all: N processes read, decode and encode each image once, not N times."""
        from .accel import distributed as dist

        todo = [i for i in range(self.n_items) if self.image_paths[i] and i not in self.features]
        if not dist.is_distributed():
            self.vision_features(todo, progress=progress)
            return
        todo = sorted(set().union(*dist.gather_objects(todo)))  # missing anywhere (the ranks' caches may differ)
        if todo:  # (the same on every rank)
            share = [todo[j] for j in dist.shard(len(todo))]  # this process's images
            self._gather_features(share, *self.vision_features(share, progress=progress))

    def _gather_features(self, share: list[int], feats: list[Tensor], grid: Tensor | None) -> None:
        """Every rank's share of the cache (items ``share``, their features and grids) into every
        rank's cache: which items with how many rows and which grids, then the rows themselves."""
        from .accel import distributed as dist

        flat = torch.cat(feats) if feats else torch.zeros(0, self.backbone.hidden_size, device=self.backbone.device, dtype=self.backbone.dtype)
        theirs = dist.gather_objects([(i, len(f), g) for i, f, g in zip(share, feats, [] if grid is None else grid.tolist())])
        rows = dist.gather_varying(flat, [sum(n for _, n, _ in part) for part in theirs])
        for part, block in zip(theirs, rows):
            for (i, _, g), f in zip(part, block.split([n for _, n, _ in part])):
                self.features[i] = (f, torch.tensor(g))

    # ---------------------------------------------------------------- prompts
    def prompts(self, kind: str, item_lists: Sequence[Sequence[int]]) -> list[str]:
        return [sequence_prompt(kind, [self.titles[i] for i in lst]) for lst in item_lists]

    def _prompts(self, kind: str, item_lists: Sequence[Sequence[int]]) -> Prompts:
        """Tokenized (left-padded) prompts of one kind on the CPU, with their images' cached
        features, or their pixels (on the device) where the vision cache is off."""
        if kind in ("V", "I") and self.backbone.kind != "vlm":
            raise ValueError(f"{self.backbone.name} is a text-only model: no {kind!r} prompts")
        texts = [self.backbone.render(p) for p in self.prompts(kind, item_lists)]
        grid = pixel_values = feats = None
        if kind in ("V", "I"):
            flat = [int(i) for lst in item_lists for i in lst]
            if self.speed.cache_vision:
                feats, grid = self.vision_features(flat)
            else:
                pixels, grid = self.backbone.prepare_pixels(self._load_images(flat))  # (the grid stays on the CPU)
                pixel_values = pixels.to(self.backbone.device)
            texts = self._expand_image_tokens(texts, grid)
        tok = self.backbone.tokenizer(texts, return_tensors="pt", padding=True)
        return Prompts(kind, tok["input_ids"], tok["attention_mask"], None if grid is None else grid.cpu(),
                       pixel_values, feats)

    def layout(self, requests: Sequence[tuple[str, Sequence[Sequence[int]]]]):
        """The packed forward's inputs for ``requests`` (``(kind, item lists)`` pairs), worked out on
        the CPU (:meth:`Backbone.layout`), or None where :meth:`embed_sets` does not pack. Pure CPU
        work when the vision cache holds the images: a trainer lays out its next micro-batch while
        the device still computes this one."""
        if not (self.speed.packed and self.backbone.can_pack):
            return None
        return self.backbone.layout([self._prompts(kind, lists) for kind, lists in requests])

    def embed_sets(self, requests: Sequence[tuple[str, Sequence[Sequence[int]]]], layout=None,
                   forward_groups: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
        """Several sets of prompts (e.g. a training step's text and image histories and targets)
        -> their (B_k, d) embeddings, through :meth:`Backbone.embed` (packed into one forward where
        ``speed.packed`` and the backbone allow, else one padded forward per set; the same
        embeddings up to float rounding, tested). ``layout``: these requests' :meth:`layout`, worked
        out beforehand. ``forward_groups``: groups of request indices packed into forwards of their
        own (see :func:`~vlm2rec_lab.accel.packing.embed_layout`; the padded forwards are apart
        already). Gradients flow when enabled by the caller (training); the vision features never
        need them."""
        layout = layout if layout is not None else self.layout(requests)
        prompt_sets = None if layout is not None else [self._prompts(kind, lists) for kind, lists in requests]
        return self.backbone.embed(prompt_sets, layout, self.speed.share_prefix, forward_groups)

    def _expand_image_tokens(self, texts: list[str], grid: Tensor) -> list[str]:
        pad = self.backbone.image_token
        counts = iter(self.backbone.tokens_per_image(g) for g in grid.tolist())
        out = []
        for t in texts:
            parts = t.split(pad)
            out.append(parts[0] + "".join(pad * next(counts) + p for p in parts[1:]))
        return out

    @torch.inference_mode()
    def embed_many(self, kind: str, item_lists: Sequence[Sequence[int]], batch_size: int | None = None,
                   progress: bool = False, desc: str | None = None) -> Tensor:
        """Embed many item lists without gradients, batched by length (longest first), input order
        kept; each batch one forward (:meth:`embed_sets`: packed where the backbone can). Image
        prompts first fill the vision cache for all their images (read ahead by worker threads);
        the results stay on the device until the end, so the CPU lays out the next batch while the
        device computes this one. LoRA updates are merged into their weights meanwhile (see
        ``speed.merge_adapters``); where a batch runs out of device memory, the batches step down
        (:func:`~vlm2rec_lab.accel.recovery.embed_in_batches`; a prompt's embedding does not depend
        on its batch)."""
        from tqdm.auto import tqdm

        from .accel.recovery import embed_in_batches

        if kind in ("V", "I") and self.speed.cache_vision:
            self.vision_features(sorted({int(i) for lst in item_lists for i in lst}), progress=progress)
        order = np.argsort([-len(x) for x in item_lists], kind="stable")
        with tqdm(total=len(order), desc=desc or f"embed {kind}", unit="prompt", disable=not progress or None,
                  leave=False) as bar:
            parts = embed_in_batches(
                self.backbone, lambda rows: self.embed_sets([(kind, [item_lists[k] for k in rows])])[0], order,
                batch_size or self.batch_size, self.speed.merge_adapters, bar.update, f"{kind} prompts",
                lambda row: f"a list of {len(item_lists[row])} items")
        out = torch.empty(len(item_lists), self.backbone.hidden_size)
        if parts:
            out[torch.as_tensor(order)] = torch.cat(parts).cpu()  # one copy back, at the end
        return out

    def item_embeddings(self, kind: str, idx: Sequence[int] | None = None, **kw) -> Tensor:
        """(n, d) embeddings of items through the one-item prompt (the template at index 0)."""
        idx = range(self.n_items) if idx is None else idx
        return self.embed_many(kind, [[int(i)] for i in idx], **kw)

    def sequence_embeddings(self, kind: str, histories: np.ndarray, **kw) -> Tensor:
        """(n, d) embeddings of right-aligned, -1-padded histories."""
        return self.embed_many(kind, [row[row >= 0].tolist() for row in np.asarray(histories)], **kw)
