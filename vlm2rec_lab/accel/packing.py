"""Packed forwards: many prompts in one row without padding, attention kept within each prompt
(:mod:`~vlm2rec_lab.accel.attention`), the leading tokens that prompts of a kind share computed
once. The same embeddings as padded batches up to float rounding (tested), with one launch per
operator instead of one per batch. ``Encoder.layout`` lays prompts out for it where
``SpeedConfig.packed`` asks and the backbone can (:func:`can_pack`); ``Backbone.embed`` then runs
the packed forward.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class Layout(NamedTuple):
    """A packed forward's inputs laid out on the CPU (:func:`layout`)."""

    sequences: list[Tensor]  # token ids per prompt
    positions: list[Tensor]  # (3, length) rotary positions per prompt
    features: list[Tensor]  # the images' features, in the order their tokens appear
    sizes: list[int]  # prompts per prompt set
    kinds: list[str]  # prompt kind per prompt (the shared-prefix groups)
    counts: list[int]  # image features per prompt set

    def select(self, sets: Sequence[int]) -> "Layout":
        """The layout of some of its prompt sets (in the order given), for a forward of their own."""
        prompts, feats = np.cumsum([0, *self.sizes]), np.cumsum([0, *self.counts])
        take = lambda x, bounds: [v for r in sets for v in x[bounds[r]:bounds[r + 1]]]  # noqa: E731
        return Layout(take(self.sequences, prompts), take(self.positions, prompts), take(self.features, feats),
                      [self.sizes[r] for r in sets], take(self.kinds, prompts), [self.counts[r] for r in sets])


def can_pack(backbone) -> bool:
    """Whether ``backbone`` packs: Qwen2-VL-family VLMs (multimodal rotary positions from
    ``get_rope_index``, attention through transformers' interface)."""
    from ..backbones import unwrap

    return backbone.kind == "vlm" and hasattr(unwrap(backbone.model), "get_rope_index")


def rope_positions(backbone, input_ids: Tensor, attention_mask: Tensor, image_grid_thw: Tensor | None) -> list[Tensor]:
    """Per row of a (left- or right-) padded batch: the (3, length) multimodal rotary positions of
    its real tokens — the model's own ``get_rope_index`` for prompts with images, 0..length-1 for
    text-only ones (a padded forward offsets those by the padding, which rotary attention,
    depending only on relative positions, does not see)."""
    from ..backbones import unwrap

    rows = attention_mask.bool()
    if image_grid_thw is None or not len(image_grid_thw):
        return [torch.arange(int(m.sum()), device=input_ids.device).expand(3, -1) for m in rows]
    pos, _ = unwrap(backbone.model).get_rope_index(input_ids, mm_token_type_ids=(input_ids == backbone.image_token_id).int(),
                                                   image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return [pos[:, r, m] for r, m in enumerate(rows)]


def layout(backbone, prompt_sets: Sequence) -> Layout:
    """The packed forward's inputs for ``prompt_sets`` (:class:`~vlm2rec_lab.backbones.Prompts`,
    tokens on the CPU): each prompt's real tokens, rotary positions and image features. Pure CPU
    work when the features are given: a trainer lays out its next micro-batch while the device
    still computes this one."""
    seqs, pos, feats, sizes, kinds, counts = [], [], [], [], [], []
    for p in prompt_sets:
        features = p.image_features
        if p.pixel_values is not None:
            with torch.no_grad():
                features = backbone.image_features(p.pixel_values, p.image_grid_thw)
        mask = p.attention_mask.bool()
        seqs += [ids[m] for ids, m in zip(p.input_ids, mask)]
        pos += rope_positions(backbone, p.input_ids, p.attention_mask, p.image_grid_thw)
        feats += list(features or [])
        sizes.append(len(p.input_ids))
        kinds += [p.kind] * len(p.input_ids)
        counts.append(len(features or []))
    return Layout(seqs, pos, feats, sizes, kinds, counts)


def forward_packed(backbone, sequences: list[Tensor], positions: list[Tensor],
                   image_features: list[Tensor] | None = None, prefix_groups: list | None = None) -> Tensor:
    """Many prompts in one forward, packed into one row without padding: ``sequences`` of token
    ids, their (3, length) rotary ``positions`` and the image features in the order their image
    tokens appear. Attention stays within each sequence (causal). With ``prefix_groups`` (a label
    per sequence, e.g. its prompt kind), the leading tokens that a group's prompts share (chat
    template, prompt head; never image tokens) are computed once and attended to by each prompt's
    rest (:func:`~vlm2rec_lab.accel.attention.shared_prefixes`). Returns (n, d): the final hidden
    state at each sequence's last token."""
    from .attention import packed_language_model, prime_plan, shared_prefixes
    from .transfer import to_device

    device = backbone.device
    prefix_of, skip = None, 0
    if prefix_groups is not None:
        stop = tuple(int(t) for t in (backbone.image_token_id, getattr(backbone.base_config, "video_token_id", None))
                     if t is not None)
        sequences, positions, prefix_of, skip = shared_prefixes(sequences, positions, prefix_groups, stop)
        if not skip:
            prefix_of = None
    # the layout goes over without waiting for the device (asynchronous copies through pinned memory,
    # the attention plan worked out on the CPU): no device sync in the language model's layers
    lengths = torch.tensor([len(x) for x in sequences])
    bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    cu = to_device(bounds, device)
    prime_plan(cu, bounds, prefix_of)
    ids = to_device(torch.cat(list(sequences)), device)[None]
    kw: dict = {"input_ids": ids, "use_cache": False, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "position_ids": to_device(torch.cat(list(positions), dim=1)[:, None], device),
                "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
    if image_features:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(image_features))}
    rows = to_device(bounds[1 + skip:].long() - 1, device)  # each prompt's last token
    with backbone.engine.compute(), packed_language_model(backbone.model, prefix_of, rows):
        hidden = backbone.model(**kw).last_hidden_state[0]  # (total tokens, d)
    return hidden[rows]  # (n, d)


def embed_layout(backbone, x: Layout, share_prefix: bool | None = None,
                 forward_groups: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
    """Prompt sets laid out by :func:`layout` -> their (B_k, d) embeddings (float32). ``share_prefix``:
    compute the leading tokens that prompts of a kind share once; None: where that changes nothing,
    i.e. not while a dropout draws masks (the prompts would share one mask over the prefix).
    ``forward_groups``: groups of set indices (covering all) packed into forwards of their own, so that their
    autograd graphs stay apart: a gradient of one group's embeddings then costs a backward over
    that group's tokens only."""
    share = share_prefix if share_prefix is not None else not backbone.engine.dropout_active

    def forward(part: Layout) -> list[Tensor]:
        out = forward_packed(backbone, part.sequences, part.positions, part.features or None,
                             part.kinds if share else None).float()
        return list(out.split(part.sizes))

    if forward_groups is None:
        return forward(x)
    if sorted(r for g in forward_groups for r in g) != list(range(len(x.sizes))):
        raise ValueError(f"forward_groups={forward_groups!r}: each of the {len(x.sizes)} prompt sets in exactly one group")
    out: list = [None] * len(x.sizes)
    for group in forward_groups:
        for r, z in zip(group, forward(x.select(group))):
            out[r] = z
    return out
