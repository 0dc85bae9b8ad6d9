"""The item- and history-embedding figures of ``gpu_bench.py``: Beauty-shaped prompts (``Shapes``),
the plain Hugging Face path and the project's (vision cache, packing, shared prefixes), the vision
tower alone, test histories, and item embedding with a LoRA adapter merged or not.
"""
from __future__ import annotations

import contextlib
import time

import torch
from common import BEAUTY_ITEMS, BEAUTY_USERS, peak_gib, profile_step, reset_peak, settle, sync

class Shapes:
    """Beauty-shaped token sequences: ~25-token titles (all 25, or 15-35 with ``vary``), a
    chat-template prefix, one image per item."""

    def __init__(self, cfg, n_items: int, image_px: int, gen: torch.Generator, device, vary: bool = False):
        self.cfg, self.device = cfg, device
        v = cfg.text_config.vocab_size
        lengths = torch.randint(15, 36, (n_items,), generator=gen) if vary else torch.full((n_items,), 25)
        self.titles = [torch.randint(100, v - 10, (int(n),), generator=gen) for n in lengths]
        self.prefix = torch.randint(100, v - 10, (24,), generator=gen).tolist()
        self.suffix = torch.randint(100, v - 10, (5,), generator=gen).tolist()
        side = image_px // 14
        self.grid = torch.tensor([1, side, side])
        self.n_patches = side * side
        self.n_tokens = self.n_patches // 4
        patch_dim = 3 * 2 * 14 * 14
        self.pixels = torch.randn(n_items, self.n_patches, patch_dim, generator=gen).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)

    def prompt(self, kind: str, items: list[int]) -> list[int]:
        c = self.cfg
        out = list(self.prefix)
        for k, i in enumerate(items):
            out += [10 + k, 20]
            if kind == "T":
                out += self.titles[i].tolist()
            else:
                out += [c.vision_start_token_id] + [c.image_token_id] * self.n_tokens + [c.vision_end_token_id]
            out.append(30)
        return out + self.suffix

    def batch(self, kind: str, item_lists: list[list[int]]) -> dict:
        seqs = [self.prompt(kind, lst) for lst in item_lists]
        L = max(map(len, seqs))
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding
            ids[r, L - len(s):] = torch.tensor(s)
            mask[r, L - len(s):] = 1
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if kind == "V":
            flat = [i for lst in item_lists for i in lst]
            out["items"] = flat
            out["image_grid_thw"] = self.grid.repeat(len(flat), 1).to(self.device)
            out["mm_token_type_ids"] = (out["input_ids"] == self.cfg.image_token_id).int()
        return out


def vision_features(backbone, shapes: Shapes, items: list[int]) -> dict:
    """Item -> its image's vision features (the project's vision cache), 256 images a call."""
    feats = {}
    for s in range(0, len(items), 256):
        chunk = items[s:s + 256]
        feats.update(zip(chunk, backbone.image_features(shapes.pixels[chunk].flatten(0, 1), shapes.grid.repeat(len(chunk), 1))))
    return feats


def plain_hidden(model, shapes: Shapes, b: dict):
    kw = {k: b[k] for k in ("input_ids", "attention_mask")}
    if "items" in b:
        kw.update(pixel_values=shapes.pixels[b["items"]].flatten(0, 1), image_grid_thw=b["image_grid_thw"],
                  mm_token_type_ids=b["mm_token_type_ids"])
    out = model(**kw, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, -1]


def project_hidden(backbone, feats: dict, b: dict):
    from vlm2rec_lab.backbones import last_token_pool

    image_features = [feats[i] for i in b["items"]] if "items" in b else None
    h = backbone.forward(b["input_ids"], b["attention_mask"], image_grid_thw=b.get("image_grid_thw"), image_features=image_features)
    return last_token_pool(h, b["attention_mask"])


def embed_items(hidden_fn, n: int, batch: int) -> None:
    """Items 0..n-1 through ``hidden_fn(kind, item_lists)``, image and text prompts, ``batch`` at a time."""
    for s in range(0, n, batch):
        items = [[i] for i in range(s, min(s + batch, n))]
        hidden_fn("V", items)
        hidden_fn("T", items)


def project_embedding(backbone, shapes: Shapes, n_items: int, batch: int, device, emit, path: str = "project",
                      layout: str = "prefixed", warm_items: tuple[int, ...] = (8,)) -> tuple[float, dict]:
    """The project's item embedding: the vision cache (each image once, large batches), then the
    image and text prompts in batches of ``batch``, packed with their shared prefix computed once
    (``layout`` "prefixed"), packed each prompt whole ("packed") or as padded batches ("padded"); a
    warm-up pass on ``warm_items`` items first (compiling, where layers are compiled: a second pass
    of other sizes makes dynamo compile again, with dynamic sizes, before the timed pass). Emits the
    figure; returns (items/s, the features)."""
    warm_s = 0.0
    for k, n in enumerate((*warm_items, n_items)):
        warm = k < len(warm_items)
        settle(device); reset_peak(device); t = time.perf_counter()
        feats = vision_features(backbone, shapes, list(range(n)))
        sync(device)
        t_vision = time.perf_counter() - t
        if layout != "padded":
            embed_items(lambda kind, items: project_packed(backbone, feats, shapes, [(kind, items)], layout == "prefixed"), n, batch)
        else:
            embed_items(lambda kind, items: project_hidden(backbone, feats, shapes.batch(kind, items)), n, batch)
        sync(device)
        rate = n / (time.perf_counter() - t)
        if warm:
            warm_s += time.perf_counter() - t
    emit(figure="item_embedding", path=path, batch=batch, items=n_items, items_per_s=round(rate, 1),
         vision_share=round(t_vision * rate / n_items, 3), beauty_s=round(BEAUTY_ITEMS / rate, 1),
         warm_up_s=round(warm_s, 1), peak_gib=peak_gib(device))
    return rate, feats


def project_packed(backbone, feats: dict, shapes: Shapes, requests: list, share_prefix: bool = True) -> list:
    """The project's training path: a step's prompt sets packed into one forward, no padding, the
    leading tokens that prompts of one kind share computed once (``share_prefix``)."""
    from vlm2rec_lab.accel.packing import forward_packed, rope_positions

    seqs, pos, fl, sizes, kinds = [], [], [], [], []
    for kind, lists in requests:
        b = shapes.batch(kind, lists)
        mask = b["attention_mask"].bool()
        seqs += [ids[m] for ids, m in zip(b["input_ids"], mask)]
        pos += rope_positions(backbone, b["input_ids"], b["attention_mask"], b.get("image_grid_thw"))
        fl += [feats[i] for i in b.get("items", [])]
        sizes.append(len(lists))
        kinds += [kind] * len(lists)
    return list(forward_packed(backbone, seqs, pos, fl or None, kinds if share_prefix else None).split(sizes))


def plain_embedding(model, shapes: Shapes, n_items: int, device, emit) -> float:
    """Hugging Face's path (pixel values every call, SDPA per vision window), batches of 32, after a
    warm-up pass on 8 items. Emits the figure; returns items/s."""
    from vlm2rec_lab.accel.attention import set_vision_attention

    set_vision_attention(model, varlen=False)
    for n in (8, n_items):  # one warm-up pass on a few items
        settle(device); reset_peak(device); t = time.perf_counter()
        embed_items(lambda kind, items: plain_hidden(model, shapes, shapes.batch(kind, items)), n, 32)
        sync(device)
        rate = n / (time.perf_counter() - t)
    emit(figure="item_embedding", path="plain", batch=32, items=n_items, items_per_s=round(rate, 1),
         beauty_s=round(BEAUTY_ITEMS / rate, 1), peak_gib=peak_gib(device))
    return rate


# the vision tower's paths: Hugging Face's (Conv3d patch embedding, its norms, SDPA per window, its index
# tensors worked out on the device), then the project's stand-ins with SDPA per window, grouped SDPA with
# the index tensors from the device ("device_index") and from the CPU ("grouped": the project's path),
# the flash kernel, and the flash path with Hugging Face's vision attention, fp32 rotary, instead of the
# stand-in's ("hf_rotary")
VISION_PATHS = ("plain", "window", "device_index", "grouped", "flash", "hf_rotary")


def vision_tower(model, backbone, shapes: Shapes, n_images: int, device, emit) -> None:
    """The vision tower alone on ``n_images`` images, each of :data:`VISION_PATHS` twice (the first
    round warms up): images/s and the largest relative difference from Hugging Face's features."""
    from vlm2rec_lab.accel.attention import set_varlen_kernel, set_vision_attention, varlen_kernel
    from vlm2rec_lab.accel.fused import vision_attention_forward

    default_kernel = varlen_kernel()  # the library's default (VLM2REC_VARLEN_KERNEL)
    chunk = list(range(n_images))
    px, grids = shapes.pixels[chunk].flatten(0, 1), shapes.grid.repeat(len(chunk), 1)
    vis = {}
    for mode in VISION_PATHS * 2:
        set_vision_attention(model, varlen=mode not in ("plain", "window"))
        set_varlen_kernel("flash" if mode in ("flash", "hf_rotary") else "sdpa")
        settle(device); t = time.perf_counter()
        if mode == "plain":
            ref = list(model.model.get_image_features(px, grids.to(device), return_dict=True).pooler_output)
        elif mode == "device_index":
            with backbone.engine.compute(autocast=False):
                ref = list(model.model.get_image_features(px, grids.to(device), return_dict=True).pooler_output)
        else:
            with backbone.engine.without(vision_attention_forward) if mode == "hf_rotary" else contextlib.nullcontext():
                ref = backbone.image_features(px, grids)
        sync(device)
        vis[mode] = (len(chunk) / (time.perf_counter() - t), ref)
    set_varlen_kernel(default_kernel)
    agree = {m: max((x.float() - y.float()).abs().max().item() / y.float().abs().max().item()
                    for x, y in zip(vis[m][1], vis["plain"][1]))
             for m in VISION_PATHS[1:]}
    emit(figure="vision_tower", images=len(chunk), plain_images_per_s=round(vis["plain"][0], 1),
         per_window_images_per_s=round(vis["window"][0], 1), varlen_images_per_s=round(vis["grouped"][0], 1),
         ratio=round(vis["grouped"][0] / vis["plain"][0], 2), stand_ins_ratio=round(vis["window"][0] / vis["plain"][0], 2),
         max_rel_diff=round(agree["grouped"], 5), stand_ins_max_rel_diff=round(agree["window"], 5),
         flash_images_per_s=round(vis["flash"][0], 1), flash_ratio=round(vis["flash"][0] / vis["plain"][0], 2),
         flash_max_rel_diff=round(agree["flash"], 5),
         device_index_images_per_s=round(vis["device_index"][0], 1),
         index_on_cpu_ratio=round(vis["grouped"][0] / vis["device_index"][0], 2),
         device_index_max_rel_diff=round(agree["device_index"], 5),
         hf_rotary_images_per_s=round(vis["hf_rotary"][0], 1),
         rotary_ratio=round(vis["flash"][0] / vis["hf_rotary"][0], 2),
         hf_rotary_max_rel_diff=round(agree["hf_rotary"], 5))


def embedding_agreement(model, backbone, shapes: Shapes, feats: dict, emit) -> None:
    """The project's item-embedding paths (padded, packed, packed with shared prefixes) against
    Hugging Face's on 4 items, text and image prompts: the largest relative difference."""
    items = [[i] for i in range(4)]
    for path, fn in (("project_padded", lambda k: project_hidden(backbone, feats, shapes.batch(k, items))),
                     ("project_packed", lambda k: project_packed(backbone, feats, shapes, [(k, items)], False)[0]),
                     ("project", lambda k: project_packed(backbone, feats, shapes, [(k, items)])[0])):
        refs = {k: plain_hidden(model, shapes, shapes.batch(k, items)).float() for k in ("T", "V")}
        d = max((refs[k] - fn(k).float()).abs().max().item() / refs[k].abs().max().item() for k in ("T", "V"))
        emit(figure="item_embedding_agreement", path=path, max_rel_diff=round(d, 5))


def item_embedding_figures(model, backbone, shapes: Shapes, a, device, emit) -> tuple[float, float]:
    """Every item- and history-embedding figure without an adapter: the plain path first, then the
    vision tower, the project's three layouts, their agreement and the test histories. Returns
    (plain items/s, project items/s)."""
    from vlm2rec_lab.accel.attention import set_vision_attention

    with torch.inference_mode():
        plain_rate = plain_embedding(model, shapes, a.plain_items, device, emit)
        vision_tower(model, backbone, shapes, min(256, len(shapes.titles)), device, emit)
        set_vision_attention(model, varlen=True)
        pad_rate, _ = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit,
                                        path="project_padded", layout="padded")
        packed_rate, _ = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit,
                                           path="project_packed", layout="packed")
        proj_rate, feats = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit)
        emit(figure="item_embedding_ratio", ratio=round(proj_rate / plain_rate, 2),
             padded_ratio=round(pad_rate / plain_rate, 2), packed_ratio=round(packed_rate / plain_rate, 2))
        embedding_agreement(model, backbone, shapes, feats, emit)
        history_embedding(model, backbone, shapes, feats, a.users, a.embed_batch, device, emit)
    return plain_rate, proj_rate


# Beauty's test histories (the Amazon 2014 Beauty 5-core file: the items before each user's test
# target, at most 10): how many of its 22,363 users have 4, 5, ..., 10 items (6.25 on average). The
# projected figure applies these lengths to the paper's 19,757 users.
BEAUTY_HISTORY_LENGTHS = {4: 7162, 5: 4221, 6: 2680, 7: 1811, 8: 1366, 9: 881, 10: 4242}
BEAUTY_MEAN_HISTORY = sum(k * n for k, n in BEAUTY_HISTORY_LENGTHS.items()) / sum(BEAUTY_HISTORY_LENGTHS.values())


def history_embedding(model, backbone, shapes: Shapes, feats: dict, n_users: int, batch: int, device, emit,
                      plain_users: int = 32) -> None:
    """Every user's test history embedded, text and image prompt, as ``vlm2rec-lab embed`` and the
    evaluation do: with Beauty's history lengths about 13x the language model's tokens of item
    embedding. Plain path: padded batches of 8 users with pixel values every call (``plain_users``
    users); project path: the vision features from the cache that item embedding filled (``feats``),
    batches of ``batch`` users sorted by length, packed with shared prefixes, as
    ``Encoder.embed_many``. Each path first runs one untimed batch. The two samples' histories differ
    in length, so rates are taken per history item and projected with Beauty's mean length (6.25
    items) onto the paper's 19,757 users; emits those, the ratio, and the agreement on 4 users."""
    g = torch.Generator().manual_seed(3)
    lengths = list(BEAUTY_HISTORY_LENGTHS)
    draw = torch.multinomial(torch.tensor(list(BEAUTY_HISTORY_LENGTHS.values()), dtype=torch.float), n_users,
                             replacement=True, generator=g)
    items = sorted(feats)
    hists = [[items[int(k)] for k in torch.randint(0, len(items), (lengths[int(d)],), generator=g)] for d in draw]

    def run(path: str, users: list, bs: int) -> None:
        for s in range(0, len(users), bs):
            for kind in ("V", "T"):
                lists = users[s:s + bs]
                if path == "plain":
                    plain_hidden(model, shapes, shapes.batch(kind, lists))
                else:
                    project_packed(backbone, feats, shapes, [(kind, lists)])

    rates = {}
    for path, users, bs in (("plain", hists[:plain_users], 8), ("project", sorted(hists, key=len, reverse=True), batch)):
        run(path, users[:bs], bs)  # warm-up (not timed)
        settle(device); reset_peak(device); t = time.perf_counter()
        run(path, users, bs)
        sync(device)
        rates[path] = sum(map(len, users)) / (time.perf_counter() - t)  # history items a second
        users_per_s = rates[path] / BEAUTY_MEAN_HISTORY
        emit(figure="history_embedding", path=path, users=len(users), batch=bs, items_per_s=round(rates[path], 1),
             mean_items=round(sum(map(len, users)) / len(users), 2), users_per_s=round(users_per_s, 1),
             beauty_s=round(BEAUTY_USERS / users_per_s, 1), peak_gib=peak_gib(device))
    few, d = hists[:4], 0.0
    for k in ("T", "V"):
        ref = plain_hidden(model, shapes, shapes.batch(k, few)).float()
        d = max(d, ((ref - project_packed(backbone, feats, shapes, [(k, few)])[0].float()).abs().max() / ref.abs().max()).item())
    emit(figure="history_embedding_ratio", ratio=round(rates["project"] / rates["plain"], 2), max_rel_diff=round(d, 5))


def lora_item_embedding(backbone, peft, shapes: Shapes, a, device, emit, no_adapter_rate: float | None) -> None:
    """Item embedding with a LoRA adapter on, as after training (B random instead of PEFT's zeros,
    put back afterwards): the adapters in training form (each adapted projection's base product, its
    product with A and the addmm with B) against their updates merged into the weights
    (``SpeedEngine.merged_adapters``, what ``Encoder.embed_many`` does), both packed with shared
    prefixes; their agreement, the time the merge takes, and the merged path against the model
    without an adapter (``no_adapter_rate``). With ``--profile``, where the language model's part of
    one batch of the merged path spends its time."""
    gen = torch.Generator().manual_seed(2)
    bs = [p for n, p in peft.named_parameters() if "lora_B" in n]
    for p in bs:
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    try:
        _lora_item_embedding(backbone, shapes, a, device, emit, no_adapter_rate)
    finally:
        for p in bs:
            p.data.zero_()


def _lora_item_embedding(backbone, shapes: Shapes, a, device, emit, no_adapter_rate: float | None) -> None:
    items = [[i] for i in range(4)]
    rate, out = {}, {}
    with torch.inference_mode():
        for merge in (False, True):
            path = "lora_merged" if merge else "lora_unmerged"
            with backbone.engine.merged_adapters() if merge else contextlib.nullcontext(0) as n_merged:
                rate[path], feats = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit, path=path)
                out[path] = [project_packed(backbone, feats, shapes, [(k, items)])[0].float() for k in ("T", "V")]
                if merge and a.profile:  # the language model's part of one batch (the features cached)
                    n = min(a.embed_batch, a.project_items)
                    profile_step(lambda: embed_items(lambda kind, lists: project_packed(backbone, feats, shapes, [(kind, lists)]), n, n),
                                 device, emit, figure="profile_item_batch")
        settle(device); t = time.perf_counter()
        with backbone.engine.merged_adapters():
            sync(device)
            merge_s = time.perf_counter() - t
    d = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(out["lora_merged"], out["lora_unmerged"]))
    emit(figure="lora_merge", layers=n_merged, merge_s=round(merge_s, 3), max_rel_diff=round(d, 5),
         ratio=round(rate["lora_merged"] / rate["lora_unmerged"], 3),
         vs_no_adapter=round(rate["lora_merged"] / no_adapter_rate, 3) if no_adapter_rate else None)
