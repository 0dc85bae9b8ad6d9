"""GPU benchmark: the plain Hugging Face path against the project's path, side by side in one run,
for Beauty-shaped item embedding and training steps on a Qwen2.5-VL-3B-shaped model with random
weights (config from code, no download). Prints one JSON line per figure, with ratios and the
projected Beauty times (9,311 items; 19,757 users per epoch at batch 8).

    python bench/gpu_bench.py            # on a GPU: the 3B shape, bf16, 224 px images (64 visual tokens)
    python bench/gpu_bench.py --tiny     # on the CPU: the same script with a tiny config (CI / tests)

Plain path: the full model (LM head included) with pixel values on every call, hidden states via
``output_hidden_states``, padded batches in data order, LoRA through PEFT, with and without gradient
checkpointing; the vision tower's window attention as SDPA per window. Project path: the base
model only (no LM head), vision features computed once per image and reused (the vision cache), the
window attention batched per window size, larger batches for embedding, prompts packed without
padding with the leading tokens that prompts of one kind share (chat template, prompt head)
computed once, for training the four prompt sets of a step in one forward, LoRA in bf16 under
autocast with its update folded into one addmm and RMSNorm in one kernel (``vlm2rec_lab.accel.fused``), no
checkpointing. The intermediate variants show what each lever gives (``project_unpacked_peft_cast``:
the cache alone, PEFT's own forward; ``project_unpacked``: + autocast and the fused stand-ins;
``project_packed``: + packing; ``project``: + shared prefixes). These have LoRA dropout 0;
``project_paper`` is the step at the trainer's defaults for a real backbone (the paper's LoRA dropout
0.2, so no shared prefixes), and ``train_epoch_at_defaults`` the epoch a user's run takes. The
``_sdpa`` variants use grouped SDPA instead of the default varlen flash kernel. Each training figure
gives ``host_share``: the share of the step the host took to queue its work before reading the loss
back (near 1: the device waits for the host, or the step waits for the device midway; ``syncs``, for
a few variants, counts those waits). Besides the issue's figures: every user's test history embedded
(``history_embedding``: what ``vlm2rec-lab embed`` and the evaluation add to item embedding, about
13x its language-model tokens at Beauty's history lengths), and item embedding with a LoRA adapter
on, in training form against merged into the weights (``lora_merge``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch

BEAUTY_ITEMS, BEAUTY_USERS = 9_311, 19_757


def model_config(tiny: bool):
    from transformers import Qwen2_5_VLConfig

    if tiny:
        text = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1])
    else:  # Qwen2.5-VL-3B
        text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
    ids = dict(image_token_id=text["vocab_size"] - 5, video_token_id=text["vocab_size"] - 4,
               vision_start_token_id=text["vocab_size"] - 3, vision_end_token_id=text["vocab_size"] - 2)
    text.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision), **ids)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def settle(device) -> None:
    """Before a timed region: wait for the device, collect garbage and freeze what is alive, so that
    no full collection lands inside the region. A full collection walks every object the collector
    tracks, long enough in a process that has imported transformers to throw a figure off when it
    lands inside a timed batch. What an earlier call froze is unfrozen first, so that nothing stays out
    of the collector's sight beyond the next region (a full collection each call, outside timing)."""
    sync(device)
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def median_side_by_side(paths: dict, reps: int, barrier) -> tuple[dict[str, float], dict]:
    """Benchmarks run by N processes together: each path's median seconds over ``reps`` rounds after
    one warm-up round, the paths taking turns within a round, every process starting and stopping
    each timed run together (``barrier``); and each path's result from the last round. A path is a
    function that prepares a run (untimed) and returns it: a function whose result is kept."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    results = {}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, prepare in paths.items():
            run = prepare()
            barrier()
            t0 = time.perf_counter()
            results[name] = run()
            barrier()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, results


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


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
        feats = {}
        for s in range(0, n, 256):
            chunk = list(range(s, min(s + 256, n)))
            out = backbone.image_features(shapes.pixels[chunk].flatten(0, 1), shapes.grid.repeat(len(chunk), 1))
            feats.update(zip(chunk, out))
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


# Beauty's test histories (the 2014 5-core file in ../shared/data: the items before each user's test
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
    (``Backbone.merged_adapters``, what ``Encoder.embed_many`` does), both packed with shared
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


# the training variants main() measures, in its order (see there)
TRAIN_VARIANTS = ("plain_ckpt", "plain", "project_unpacked_peft_cast", "project_unpacked", "project_packed", "project",
                  "project_sdpa", "project_probe", "project_paper", "project_paper_probe", "project_paper_sdpa",
                  "project_paper_ckpt4", "project_paper_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--train-variants`` names outside :data:`TRAIN_VARIANTS` are an error (a
    misspelt one would otherwise measure nothing on a device machine's scarce minutes)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (exercises the script)")
    ap.add_argument("--plain-items", type=int, default=256)
    ap.add_argument("--project-items", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--embed-batch", type=int, default=128)
    ap.add_argument("--users", type=int, default=512, help="users whose test histories the project path embeds")
    ap.add_argument("--train-only", action="store_true", help="skip the item-embedding figures")
    ap.add_argument("--vary", action="store_true",
                    help="titles of 15-35 tokens and histories of 3-10 items instead of 25 and 7 (real data varies)")
    ap.add_argument("--train-variants", default=None, help="comma list of training variants to run (default: all)")
    ap.add_argument("--compile", action="store_true", help="also: the project step with torch.compile'd decoder layers")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend for --compile (default: inductor; aot_eager under --tiny)")
    ap.add_argument("--profile", action="store_true",
                    help="also: where the project's training step and an item-embedding batch (adapter merged) "
                         "spend their time (torch.profiler), and the packed language-model probe (one sequence "
                         "of the step's tokens, no vision tower)")
    a = ap.parse_args(argv)
    unknown = sorted(set((a.train_variants or "").split(",")) - set(TRAIN_VARIANTS) - {""})
    if unknown:
        ap.error(f"--train-variants: unknown {', '.join(unknown)} (known: {', '.join(TRAIN_VARIANTS)})")
    return a


def main() -> None:
    a = parse_args()
    if a.tiny:
        a.plain_items, a.project_items, a.steps, a.embed_batch = min(a.plain_items, 32), min(a.project_items, 64), min(a.steps, 2), 16
        a.users = min(a.users, 40)
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm2rec_lab.accel.checkpointing import checkpointed_every, enable_checkpointing
    from vlm2rec_lab.accel.compile import compile_layers
    from vlm2rec_lab.backbones import Backbone, lora_target_regex
    from vlm2rec_lab.config import PAPER_DEFAULTS
    from vlm2rec_lab.losses import ObjectiveConfig, objective
    from vlm2rec_lab.probe import PROBE_FORWARDS, modality_gradients, objective_modality_cosines

    assert [r for group in PROBE_FORWARDS for r in group] == [0, 1, 2, 3]  # (step() relies on this order)

    emit = lambda **kw: print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **kw}), flush=True)  # noqa: E731
    import importlib.util

    import transformers

    emit(figure="env", torch=torch.__version__, transformers=transformers.__version__,
         flash_attn=importlib.util.find_spec("flash_attn") is not None)
    torch.manual_seed(0)
    cfg = model_config(a.tiny)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    emit(figure="model", params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3), init_s=round(time.perf_counter() - t0, 1))
    gen = torch.Generator().manual_seed(0)
    n_items = max(a.plain_items, a.project_items)
    shapes = Shapes(cfg, n_items, 56 if a.tiny else 224, gen, device, vary=a.vary)
    backbone = Backbone(name="bench", model=model.model, tokenizer=None, image_processor=None, kind="vlm")

    # ---------------------------------------------------------------- item embeddings
    from vlm2rec_lab.accel.attention import set_varlen_kernel, set_vision_attention, varlen_kernel
    from vlm2rec_lab.accel.fused import vision_attention_forward

    default_kernel = varlen_kernel()  # the library's default (VLM2REC_VARLEN_KERNEL)

    if not a.train_only:
        with torch.inference_mode():
            set_vision_attention(model, varlen=False)  # the plain path: SDPA called once per window
            for warm in (True, False):  # one warm-up pass of each path on a few items
                n = 8 if warm else a.plain_items
                bs = 32
                settle(device); reset_peak(device); t = time.perf_counter()
                embed_items(lambda kind, items: plain_hidden(model, shapes, shapes.batch(kind, items)), n, bs)
                sync(device)
                plain_rate = n / (time.perf_counter() - t)
            emit(figure="item_embedding", path="plain", batch=32, items=a.plain_items, items_per_s=round(plain_rate, 1),
                 beauty_s=round(BEAUTY_ITEMS / plain_rate, 1), peak_gib=peak_gib(device))
            vis = {}
            chunk = list(range(min(256, n_items)))
            # the vision tower alone: Hugging Face's (Conv3d patch embedding, its norms, SDPA per window,
            # its index tensors worked out on the device), then the project's stand-ins with SDPA per
            # window, grouped SDPA with the index tensors from the device ("device_index") and from
            # the CPU (grouped: the project's path), and the flash kernel
            px, grids = shapes.pixels[chunk].flatten(0, 1), shapes.grid.repeat(len(chunk), 1)
            # (hf_rotary: the flash path with Hugging Face's vision attention, fp32 rotary, instead of the stand-in's)
            for mode in ("plain", "window", "device_index", "grouped", "flash", "hf_rotary") * 2:
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
                     for m in ("window", "device_index", "grouped", "flash", "hf_rotary")}
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
            set_vision_attention(model, varlen=True)
            pad_rate, _ = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit,
                                            path="project_padded", layout="padded")
            packed_rate, _ = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit,
                                               path="project_packed", layout="packed")
            proj_rate, feats = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit)
            emit(figure="item_embedding_ratio", ratio=round(proj_rate / plain_rate, 2),
                 padded_ratio=round(pad_rate / plain_rate, 2), packed_ratio=round(packed_rate / plain_rate, 2))
            # same numbers from the paths
            items = [[i] for i in range(4)]
            for path, fn in (("project_padded", lambda k: project_hidden(backbone, feats, shapes.batch(k, items))),
                             ("project_packed", lambda k: project_packed(backbone, feats, shapes, [(k, items)], False)[0]),
                             ("project", lambda k: project_packed(backbone, feats, shapes, [(k, items)])[0])):
                d = max((plain_hidden(model, shapes, shapes.batch(k, items)).float() - fn(k).float()).abs().max().item()
                        / plain_hidden(model, shapes, shapes.batch(k, items)).float().abs().max().item() for k in ("T", "V"))
                emit(figure="item_embedding_agreement", path=path, max_rel_diff=round(d, 5))
            history_embedding(model, backbone, shapes, feats, a.users, a.embed_batch, device, emit)

    # ---------------------------------------------------------------- training steps
    # LoRA with the paper's dropout; the variants without dropout set its p to 0 (PEFT makes no dropout
    # layer at all for 0, so that the paper's variants could not have one)
    paper_dropout = PAPER_DEFAULTS["lora_dropout"]
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=paper_dropout, target_modules=lora_target_regex("vlm")))
    backbone.engine.forget()  # LoRA went into backbone.model in place
    lora_dropouts = [m for n, m in peft.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert lora_dropouts, "no LoRA dropout layers found"

    def set_lora_dropout(p: float) -> None:
        for m in lora_dropouts:
            m.p = p
    set_lora_dropout(0.0)
    if not a.train_only:
        lora_item_embedding(backbone, peft, shapes, a, device, emit, proj_rate)
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the trainer's
    obj = ObjectiveConfig(name="vlm2rec")
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(a.steps + 1):
        if a.vary:  # Beauty-like spread: 3 to 10 items (mean about 7)
            hist = [torch.randint(0, n_items, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
                    for _ in range(8)]
        else:
            hist = torch.randint(0, n_items, (8, 7), generator=g).tolist()
        tgt = torch.randint(0, n_items, (8,), generator=g).tolist()
        batches.append((hist, [[t] for t in tgt]))
    n_tokens = sum(shapes.batch(k, lst)["attention_mask"].sum().item() for k in ("T", "V") for lst in batches[0])
    with torch.no_grad():
        all_items = sorted({i for h, t in batches for lst in h + t for i in lst})
        feats = {}
        for s in range(0, len(all_items), 256):
            chunk = all_items[s:s + 256]
            feats.update(zip(chunk, backbone.image_features(shapes.pixels[chunk].flatten(0, 1), shapes.grid.repeat(len(chunk), 1))))

    queued: list[float] = []  # per step: host seconds until all its work was queued (before its read-back)

    def step(sets_fn, batch, do_step=True, probe=False) -> float:
        t0 = time.perf_counter()
        hist, tgt = batch
        requests = [("T", hist), ("V", hist), ("T", tgt), ("V", tgt)]
        if probe:  # as the trainer's probed micro-batch: histories and targets in forwards of their own
            z_t, z_v, e_t, e_v = [z for group in PROBE_FORWARDS for z in sets_fn([requests[r] for r in group])]
        else:
            z_t, z_v, e_t, e_v = sets_fn(requests)
        emb = {k: v.float() for k, v in {"z_t": z_t, "z_v": z_v, "e_t": e_t, "e_v": e_v}.items()}
        loss = objective(obj, emb).total
        if do_step:
            opt.zero_grad(set_to_none=True)
            g_mod = modality_gradients(emb, None, params, obj.tau) if probe else None  # the trainer's probe
            loss.backward()
            if probe:
                objective_modality_cosines(g_mod, [p.grad for p in params])
            opt.step()
        queued.append(time.perf_counter() - t0)
        return loss.item()

    plain_fn = lambda reqs: [plain_hidden(peft, shapes, shapes.batch(k, lst)) for k, lst in reqs]  # noqa: E731
    unpacked_fn = lambda reqs: [project_hidden(backbone, feats, shapes.batch(k, lst)) for k, lst in reqs]  # noqa: E731
    proj_fn = lambda reqs: project_packed(backbone, feats, shapes, reqs)  # noqa: E731
    packed_fn = lambda reqs: project_packed(backbone, feats, shapes, reqs, share_prefix=False)  # noqa: E731
    with torch.no_grad():
        set_vision_attention(model, varlen=False)
        l_plain = step(plain_fn, batches[0], False)
        set_vision_attention(model, varlen=True)
        l_proj = step(proj_fn, batches[0], False)  # packed, mixed precision (on a GPU)
    emit(figure="train_loss_agreement", plain=round(l_plain, 5), project=round(l_proj, 5),
         rel_diff=round(abs(l_plain - l_proj) / abs(l_plain), 6), tokens_per_step=int(n_tokens))
    results = {}
    # (name, embedding function, checkpoint every n-th decoder layer (0: none), LoRA dropout)
    variants = (("plain_ckpt", plain_fn, 1, 0.0), ("plain", plain_fn, 0, 0.0),
                ("project_unpacked_peft_cast", unpacked_fn, 0, 0.0),  # cache only: four padded forwards, fp32 LoRA
                ("project_unpacked", unpacked_fn, 0, 0.0),  # + bf16 LoRA under autocast
                ("project_packed", packed_fn, 0, 0.0),  # + the four prompt sets packed into one forward
                ("project", proj_fn, 0, 0.0),  # + each prompt kind's shared prefix computed once
                ("project_sdpa", proj_fn, 0, 0.0),  # project with grouped SDPA instead of the default kernel
                ("project_probe", proj_fn, 0, 0.0),  # project, with the trainer's gradient-cosine probe every step
                # the trainer's defaults: the paper's LoRA dropout, and so no shared prefixes (each
                # prompt draws its own masks), with and without the probe; then what the trainer
                # falls back to when a step runs out of memory: checkpointing every 4th layer, and
                # (the last rung) every layer, packed all the same
                ("project_paper", packed_fn, 0, paper_dropout),
                ("project_paper_probe", packed_fn, 0, paper_dropout),
                ("project_paper_sdpa", packed_fn, 0, paper_dropout),
                ("project_paper_ckpt4", packed_fn, 4, paper_dropout),
                ("project_paper_ckpt", packed_fn, 1, paper_dropout))
    assert tuple(v[0] for v in variants) == TRAIN_VARIANTS
    if a.train_variants:
        variants = tuple(v for v in variants if v[0] in a.train_variants.split(","))
    for name, fn, every, dropout in variants:
        set_lora_dropout(dropout)
        set_vision_attention(model, varlen=not name.startswith("plain"))
        backbone.engine.fused = not name.endswith("peft_cast")
        set_varlen_kernel("sdpa" if name.endswith("_sdpa") else default_kernel)
        model.model.activation_checkpointing_disable()
        if every and name.startswith("plain"):  # Hugging Face's own checkpointing
            model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif every:
            enable_checkpointing(backbone, every)
        peft.train()
        probe = name.endswith("_probe")
        try:
            step(fn, batches[0], probe=probe)  # warm-up
            settle(device); reset_peak(device); queued.clear(); t = time.perf_counter()
            for b in batches[1:]:
                step(fn, b, probe=probe)
            sync(device)
            s, host = (time.perf_counter() - t) / a.steps, sum(queued) / len(queued)
            syncs = count_syncs(lambda: step(fn, batches[1], probe=probe), device) if name in SYNC_COUNTED else None
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            emit(figure="train_step", path=name, oom=True, peak_gib=peak_gib(device))
            torch.cuda.empty_cache()
            continue
        results[name] = s
        emit(figure="train_step", path=name, seconds=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
             checkpointing=checkpointed_every(backbone), checkpoint_every=every, lora_dropout=dropout, dropout_active=backbone.engine.dropout_active,
             peak_gib=peak_gib(device), host_queue_s=round(host, 3), host_share=round(host / s, 2), syncs=syncs)
    set_varlen_kernel(default_kernel)
    if not a.train_variants or "project_paper" in a.train_variants.split(","):
        # the longest step an epoch can hold (every history at the 10-item cap) at the trainer's
        # defaults: its peak memory, and where it does not fit, the fallback's rungs
        pool = torch.tensor(all_items)
        pick = lambda n: pool[torch.randint(0, len(pool), (n,), generator=g)].tolist()  # noqa: E731
        longest = ([pick(10) for _ in range(8)], [[i] for i in pick(8)])
        tokens = sum(shapes.batch(k, lst)["attention_mask"].sum().item() for k in ("T", "V") for lst in longest)
        set_lora_dropout(paper_dropout)
        for every in (0, 4, 2, 1):
            model.model.activation_checkpointing_disable()
            if every:
                enable_checkpointing(backbone, every)
            try:
                reset_peak(device)
                step(packed_fn, longest)  # (warm-up)
                settle(device); t = time.perf_counter()
                step(packed_fn, longest)
                sync(device)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                emit(figure="train_step_longest", path="project_paper", checkpoint_every=every, tokens=int(tokens), oom=True)
                torch.cuda.empty_cache()
                continue
            emit(figure="train_step_longest", path="project_paper", checkpoint_every=every, tokens=int(tokens),
                 seconds=round(time.perf_counter() - t, 3), peak_gib=peak_gib(device))
            break
    set_lora_dropout(0.0)
    model.model.activation_checkpointing_disable()
    if "project" in results:
        emit(figure="train_step_ratio", **{f"vs_{k}": round(v / results["project"], 2) for k, v in results.items() if k != "project"})
    for base, figure, dropout in (("project", "train_epoch_with_probe", 0.0),
                                  ("project_paper", "train_epoch_at_defaults", paper_dropout)):
        if base in results and f"{base}_probe" in results:  # the trainer's default probes every 10th step
            s = (9 * results[base] + results[f"{base}_probe"]) / 10
            emit(figure=figure, grad_cos_every=10, lora_dropout=dropout, shared_prefixes=base == "project",
                 seconds_per_step=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
                 vs_plain_ckpt=round(results["plain_ckpt"] / s, 2) if "plain_ckpt" in results else None,
                 probe_step_vs_step=round(results[f"{base}_probe"] / results[base], 2))
    if a.profile:  # the step at the trainer's defaults
        set_lora_dropout(paper_dropout)
        profile_step(lambda: step(packed_fn, batches[1]), device, emit)
        set_lora_dropout(0.0)
        packed_probe(peft, n_tokens, a.steps, device, dtype, emit)
    if a.compile:  # last: compiling changes the layers in place
        backend = a.compile_backend or ("aot_eager" if a.tiny else "inductor")
        compiled_step(backbone, lambda b, do_step=True: step(proj_fn, b, do_step), batches, a.steps, device, emit, results.get("plain_ckpt"),
                      backend=backend, eager_s=results.get("project"))
        if not a.train_only:  # item embedding with the vision blocks compiled too, without LoRA's adapters,
            # as the eager item embedding ran (before LoRA was applied; with them on, each adapted
            # projection adds its rank-16 products)
            compile_layers(backbone, backend=backend, vision=True)
            with torch.inference_mode(), peft.disable_adapter():
                rate, _ = project_embedding(backbone, shapes, a.project_items, a.embed_batch, device, emit, path="project_compiled",
                                            warm_items=(8, min(a.project_items, 256 + 8)))
            emit(figure="item_embedding_ratio", path="project_compiled", ratio=round(rate / plain_rate, 2))
        # last, as it compiles the layers again (a dropout rate is a constant of the compiled graphs):
        # the trainer's defaults compiled, the paper's LoRA dropout without shared prefixes. Its loss
        # cannot be compared with the eager step's: the compiled graphs draw other dropout masks.
        set_lora_dropout(paper_dropout)
        compiled_step(backbone, lambda b, do_step=True: step(packed_fn, b, do_step), batches, a.steps, device, emit,
                      results.get("plain_ckpt"), backend=backend, path="project_paper_compiled",
                      eager_s=results.get("project_paper"), probe_ratio=(results["project_paper_probe"] / results["project_paper"]
                                                                         if "project_paper_probe" in results else None),
                      profile=a.profile, run_probed=lambda b: step(packed_fn, b, probe=True))


# the variants whose device syncs a step are counted (one more step under CUDA's sync debug mode)
SYNC_COUNTED = ("project", "project_paper", "project_paper_probe")


def count_syncs(run, device) -> int | None:
    """How many times ``run`` makes the host wait for the device (CUDA's sync debug mode, set to warn,
    counted); None on the CPU. A training step needs one: the loss read back at its end (the probe
    reads its cosines back too)."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("called a synchronizing" in str(w.message) for w in caught)  # (not the mode's own notice)


def compiled_step(backbone, run_step, batches, steps: int, device, emit, plain_ckpt: float | None, backend: str,
                  path: str = "project_compiled", eager_s: float | None = None, probe_ratio: float | None = None,
                  profile: bool = False, run_probed=None) -> None:
    """The project step with the language model's decoder layers compiled (compiled already: compiled
    again where a constant changed): the first step's time (compiling included) apart from the
    steady state, which is timed after a second, untimed step (a step of another token count makes
    dynamo compile once more, with dynamic sizes). For ``project_compiled``, its loss against the eager step's on the same batch and
    weights (the first step's loss is taken before its update). With ``probe_ratio`` (a probed
    step's time over a plain step's, eager), the epoch at the default probing (every 10th step) is
    estimated from it; with ``run_probed`` (a probed step, compiled too: the trainer's default where
    ``--compile auto`` compiles) it is measured, after one untimed probed step. With ``profile``, one
    more step is profiled (``profile_step_compiled``): where the compiled step's time goes."""
    from vlm2rec_lab.accel.compile import compile_layers

    try:
        eager = run_step(batches[0], do_step=False) if path == "project_compiled" else None
        compile_layers(backbone, backend=backend, retained_backward=run_probed is not None)  # (as the trainer does)
        sync(device); t = time.perf_counter()
        compiled = run_step(batches[0])
        sync(device)
        first = time.perf_counter() - t
        run_step(batches[1])  # a second shape: dynamo compiles once more, with dynamic sizes (not timed)
        settle(device); reset_peak(device); t = time.perf_counter()
        for b in batches[1:]:
            run_step(b)
        sync(device)
        s = (time.perf_counter() - t) / steps
        peak, probed = peak_gib(device), None  # (the step's own peak, as in the other rows)
        if run_probed is not None:
            run_probed(batches[0])  # (untimed: the probe's forwards apart may compile once more)
            settle(device); t = time.perf_counter()
            for b in batches[1:]:
                run_probed(b)
            sync(device)
            probed = (time.perf_counter() - t) / steps
    except Exception as e:  # noqa: BLE001  (a compiler failure is a figure too)
        emit(figure="train_step", path=path, error=f"{type(e).__name__}: {str(e)[:300]}")
        return
    row = dict(figure="train_step", path=path, backend=backend, seconds=round(s, 3), first_step_s=round(first, 1),
               beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1), peak_gib=peak,
               vs_plain_ckpt=round(plain_ckpt / s, 2) if plain_ckpt else None,
               vs_eager=round(eager_s / s, 2) if eager_s else None)
    if eager is not None:
        row.update(loss_eager=round(eager, 5), loss_compiled=round(compiled, 5), loss_rel_diff=round(abs(compiled - eager) / abs(eager), 6))
    if probe_ratio is not None:
        est = s * (9 + probe_ratio) / 10
        row.update(beauty_epoch_min_with_probe_est=round(est * BEAUTY_USERS / 8 / 60, 1))
    if probed is not None:
        row.update(probe_seconds=round(probed, 3), probe_step_vs_step=round(probed / s, 2), probe_peak_gib=peak_gib(device),
                   beauty_epoch_min_with_probe=round((9 * s + probed) / 10 * BEAUTY_USERS / 8 / 60, 1))
    emit(**row)
    if profile:
        profile_step(lambda: run_step(batches[1]), device, emit, figure="profile_step_compiled")


def profile_step(run_step, device, emit, rows: int = 20, figure: str = "profile_step") -> None:
    """Where ``run_step`` (one project training step; or, with another ``figure``, an item-embedding
    batch) spends its time: the top operators and kernels by self device (or CPU) time (``profile_op``
    rows, with ``of``: the figure), and the device's busy time (kernels; the profiler slows the host,
    so the wall time here is longer than a step's)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        run_step()
        sync(device)
    wall = time.perf_counter() - t
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_" + key, 0.0))
    from torch.autograd import DeviceType

    busy = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()  # kernels only: not the
               if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e6  # operators
    # that launched them, nor annotated spans (the optimizer step's) on the device's timeline
    emit(figure=figure, wall_s=round(wall, 3), device_busy_s=round(busy, 3))
    for e in avgs[:rows]:
        emit(figure="profile_op", of=figure, op=e.key[:80], calls=e.count, total_ms=round(getattr(e, key, 0.0) / 1e3, 2),
             self_ms=round(getattr(e, "self_" + key, 0.0) / 1e3, 2))


def packed_probe(peft, n_tokens: int, steps: int, device, dtype, emit) -> None:
    """The issue's headroom probe: the language model's forward + backward with LoRA over one step's
    tokens packed into one sequence (random input embeddings), no vision tower, no checkpointing."""
    lm = peft.get_base_model().model.language_model
    d = lm.config.hidden_size
    x = torch.randn(1, n_tokens, d, device=device, dtype=dtype)
    pos = torch.arange(n_tokens, device=device)[None].expand(3, 1, -1)
    for k in range(steps + 1):
        if k == 1:
            settle(device); reset_peak(device); t = time.perf_counter()
        h = lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        h[0, -32:].float().pow(2).mean().backward()
    sync(device)
    s = (time.perf_counter() - t) / steps
    emit(figure="packed_lm_probe", tokens=n_tokens, seconds=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
         peak_gib=peak_gib(device))


if __name__ == "__main__":
    main()
