"""What the benchmarks share: the Beauty sizes the figures project onto, a Qwen2.5-VL config from
code (3B-shaped, or tiny for the CPU), and timing helpers (device syncs, a settled collector,
side-by-side medians, peak memory, sync counts, a profiler summary).
"""
from __future__ import annotations

import gc
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
