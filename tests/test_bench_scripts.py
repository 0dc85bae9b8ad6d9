"""The benchmarks' CPU modes run (so CI exercises the scripts); their figures are not asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 63 s: the slowest default-tier test, a benchmark's CPU smoke run (the default tier stays under 10 min)
def test_gpu_bench_tiny_runs_both_paths_and_they_agree(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--compile", "--profile"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    figures = {(x["figure"], x.get("path")) for x in rows}
    assert {("item_embedding", "plain"), ("item_embedding", "project"), ("item_embedding", "project_padded"),
            ("item_embedding", "project_packed"), ("train_step", "plain_ckpt"), ("train_step", "project_sdpa"),
            ("train_step", "project_paper_sdpa"), ("train_step", "project_packed"),
            ("train_step", "project"), ("train_step", "project_compiled"), ("item_embedding", "project_compiled"), ("vision_tower", None),
            ("train_step", "project_probe"), ("train_epoch_with_probe", None),
            ("train_step", "project_paper"), ("train_step", "project_paper_probe"), ("train_epoch_at_defaults", None),
            ("train_step", "project_paper_compiled"), ("train_step", "project_paper_ckpt4"),
            ("train_step", "project_paper_ckpt"), ("train_step_longest", "project_paper")} <= figures
    compiled = next(x for x in rows if x["figure"] == "train_step" and x.get("path") == "project_compiled")
    assert "error" not in compiled and compiled["loss_rel_diff"] <= 1e-4  # aot_eager: the eager step's loss
    paper = next(x for x in rows if x["figure"] == "train_step" and x.get("path") == "project_paper_compiled")
    # the figures' arithmetic, not their timing (a busy machine can time a probed step below a plain one)
    assert "error" not in paper and paper["beauty_epoch_min_with_probe_est"] > 0 and paper["probe_seconds"] > 0
    per_min = 19_757 / 8 / 60  # common.BEAUTY_USERS, batch 8, minutes
    assert paper["beauty_epoch_min"] == pytest.approx(paper["seconds"] * per_min, abs=0.1 + 0.001 * per_min)
    assert paper["beauty_epoch_min_with_probe"] == pytest.approx(
        (9 * paper["seconds"] + paper["probe_seconds"]) / 10 * per_min, abs=0.1 + 0.001 * per_min)
    steps = {x["path"]: x for x in rows if x["figure"] == "train_step"}
    assert steps["project_paper"]["dropout_active"] and not steps["project"]["dropout_active"]
    assert steps["project_paper_ckpt4"]["checkpointing"] and not steps["project_paper"]["checkpointing"]
    defaults = next(x for x in rows if x["figure"] == "train_epoch_at_defaults")
    assert defaults["lora_dropout"] == 0.2 and not defaults["shared_prefixes"]
    agree = next(x for x in rows if x["figure"] == "train_loss_agreement")
    assert agree["rel_diff"] <= 1e-2
    longest = next(x for x in rows if x["figure"] == "train_step_longest")  # (histories of 10 items against 7)
    assert longest["checkpoint_every"] == 0 and "oom" not in longest and longest["tokens"] > agree["tokens_per_step"]
    emb = [x for x in rows if x["figure"] == "item_embedding_agreement"]
    assert {x["path"] for x in emb} == {"project", "project_packed", "project_padded"}
    assert all(x["max_rel_diff"] <= 1e-3 for x in emb)  # fp32 on the CPU
    (tmp_path / "bench.jsonl").write_text(r.stdout)  # the targets table reads the script's own output
    t = subprocess.run([sys.executable, str(ROOT / "bench" / "targets.py"), str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert t.returncode == 0, t.stderr[-2000:]
    hist = next(x for x in rows if x["figure"] == "history_embedding_ratio")  # users' histories: plain and packed agree
    assert hist["max_rel_diff"] <= 1e-3 and {("history_embedding", "plain"), ("history_embedding", "project")} <= figures
    lora = next(x for x in rows if x["figure"] == "lora_merge")  # an adapter merged for embedding: fp32, the same numbers
    assert lora["layers"] > 0 and lora["max_rel_diff"] <= 1e-4 and lora["ratio"] > 0
    assert {("item_embedding", "lora_unmerged"), ("item_embedding", "lora_merged"), ("profile_item_batch", None),
            ("profile_step", None), ("profile_step_compiled", None)} <= figures
    assert {x.get("of") for x in rows if x["figure"] == "profile_op"} >= {"profile_step", "profile_step_compiled", "profile_item_batch"}
    vision = next(x for x in rows if x["figure"] == "vision_tower")  # fp32: the stand-in's rotary is HF's
    assert vision["hf_rotary_max_rel_diff"] <= 1e-4 and vision["max_rel_diff"] <= 1e-4 and vision["rotary_ratio"] > 0
    for target in ("item embedding", "epoch", "loss within", "peak memory", "probed step", "compiled / eager",
                   "probed step / step at the defaults, compiled",
                   "adapter, merged / unmerged", "test histories", "rotary"):
        assert target in t.stdout, target


def test_targets_table_reads_the_figures_of_a_device_check(tmp_path, capsys):
    """Figures of the H100 run of 2026-11-26 (A): the fastest project path against the plain path of
    the same run, from items/s; the smallest epoch with its source, from seconds a step; the loss
    bound for the compiled step (its difference from eager added to eager's from plain); a step that
    ran out of memory is no figure; a cut-off last line is skipped, a broken one elsewhere is not."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from targets import levers, read, targets
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = [{"figure": "item_embedding", "path": "plain", "items_per_s": 78.9, "beauty_s": 118.0},
            {"figure": "item_embedding", "path": "project_padded", "items_per_s": 238.5, "beauty_s": 39.0},
            {"figure": "item_embedding", "path": "project", "items_per_s": 233.2, "beauty_s": 39.9},
            {"figure": "train_loss_agreement", "plain": 2.57435, "project": 2.57007, "rel_diff": 0.001662},
            {"figure": "train_step", "path": "plain_ckpt", "seconds": 5.674, "beauty_epoch_min": 233.5, "peak_gib": 13.25},
            {"figure": "train_step", "path": "project_paper", "seconds": 0.379, "beauty_epoch_min": 15.6, "peak_gib": 47.06},
            {"figure": "train_step", "path": "project_paper_probe", "seconds": 0.795, "beauty_epoch_min": 32.7},
            {"figure": "train_epoch_at_defaults", "seconds_per_step": 0.42, "beauty_epoch_min": 17.3},
            {"figure": "train_step", "path": "project_paper_compiled", "seconds": 0.34, "vs_eager": 1.11,
             "first_step_s": 18.1, "loss_rel_diff": 0.0035, "beauty_epoch_min_with_probe_est": 15.5}]
    (tmp_path / "bench.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\nTraceback (most recent call last):\n")
    got = {t[0].split(" <=")[0]: t for t in targets(read(tmp_path / "bench.jsonl"))}
    assert got["Beauty item embedding"][1:] == ("39.0 s (project_padded)", "118.0 s", "3.02x", "no")
    assert got["Beauty epoch"][1:] == ("15.5 min (defaults, compiled (probe estimated))", "233.5 min", "15.07x", "no")
    assert got["loss within 0.01 of plain (relative)"][1:] == ("0.0017; compiled 0.0052 at most", "2.57435", "", "yes")
    assert got["peak memory reported"][1] == "47.06 GiB (defaults)"
    quick = [{"figure": "pipeline_train_steps", "mean_step_s": 0.2187}]  # the Trainer's own epoch, when it is the best
    assert targets(rows, quick)[1][1:] == ("9.0 min (the Trainer at its defaults)", "233.5 min", "25.94x", "yes")
    assert dict(levers(rows, []))["probed step / step at the defaults"] == "2.10"
    # the compiled probe measured (the trainer's default where --compile auto compiles): it is the epoch's source
    # (above the estimate of 15.5 min: taken as measured, not as the smaller figure)
    measured = rows[:-1] + [{**rows[-1], "probe_seconds": 0.748, "probe_step_vs_step": 2.2, "beauty_epoch_min_with_probe": 16.0}]
    assert targets(measured)[1][1:] == ("16.0 min (defaults, compiled)", "233.5 min", "14.60x", "no")
    assert dict(levers(measured, []))["probed step / step at the defaults, compiled"] == "2.20"
    hist = [{"figure": "history_embedding", "path": "plain", "items_per_s": 62.5, "users_per_s": 10.0, "beauty_s": 1975.7},
            {"figure": "history_embedding", "path": "project", "items_per_s": 312.5, "users_per_s": 50.0, "beauty_s": 395.1}]
    assert dict(levers(hist, []))["Beauty's test histories embedded (what `embed` adds to items)"] == "395.1 s, 5.00x plain"
    merge = [{"figure": "lora_merge", "layers": 252, "merge_s": 0.01, "max_rel_diff": 0.01, "ratio": 1.075, "vs_no_adapter": 0.98}]
    assert dict(levers(merge, []))["item embedding with an adapter, merged / unmerged"] == \
        "1.07 (no adapter / merged 1.02; merge 0.01 s, max rel diff 0.01)"
    # out of memory: the plain step leaves the epoch's ratio open, the paper step reports no peak
    oom = [r for r in rows if r.get("path") not in ("plain_ckpt", "project_paper")] + [
        {"figure": "train_step", "path": "plain_ckpt", "oom": True, "peak_gib": 79.1},
        {"figure": "train_step", "path": "project_paper", "oom": True, "peak_gib": 79.1}]
    got = {t[0].split(" <=")[0]: t for t in targets(oom)}
    assert got["Beauty epoch"][2:] == ("not measured", "", "no")
    assert got["peak memory reported"][1:] == ("out of memory", "", "", "no")
    (tmp_path / "cut.jsonl").write_text('{"figure": "env"}\n{"figure": "item_emb')  # a timeout mid-line
    assert read(tmp_path / "cut.jsonl") == [{"figure": "env"}] and "cut.jsonl:2" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"figure": "env"}\n{"figure": \n{"figure": "env"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read(tmp_path / "bad.jsonl")


def test_item_embedding_bench_runs_its_paths_and_they_agree(synth_ds, tiny_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "embed_items.py"), "--data", str(synth_ds.path), "--repeats", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {x["path"] for x in rows if x["figure"] == "item_embedding"} == {"padded", "packed", "packed_shared_prefix",
                                                                            "lora_unmerged", "lora_merged"}
    ratios = [x for x in rows if x["figure"] == "item_embedding_ratio"]
    assert len(ratios) == 2 and all(x["max_rel_diff"] <= 1e-4 for x in ratios)
    merge, = [x for x in rows if x["figure"] == "lora_merge_ratio"]  # (the same numbers: fp32 on the CPU)
    assert merge["path"] == "lora_merged" and merge["vs_lora_unmerged"] > 0 and merge["max_rel_diff"] <= 1e-4


def test_image_cache_bench_fills_the_cache_both_ways_with_the_same_features(synth_ds, tiny_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "image_cache.py"), "--data", str(synth_ds.path),
                        "--images", "24", "--size", "120", "--repeats", "1", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["figure"], x.get("path")): x for x in map(json.loads, (l for l in r.stdout.splitlines() if l.startswith("{")))}
    assert rows[("image_cache_fill", "plain")]["workers"] == 0 and rows[("image_cache_fill", "project")]["workers"] == 2
    assert rows[("image_cache_fill", "plain")]["visual_tokens"] == 16  # 120 px fits 224^2: 112 x 112 px, 8 x 8 patches
    assert rows[("image_cache_ratio", None)]["max_abs_diff"] == 0.0
    cpu = rows[("image_cpu_side", None)]
    assert cpu["workers"] == 2 and cpu["beauty_seconds"] == pytest.approx(cpu["ms_per_image"] * 9.311, abs=0.1)


def test_pipeline_bench_embeds_items_from_jpeg_files_both_ways_alike():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline_embed.py"), "--tiny", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    runs = {x["path"]: x for x in rows if x["figure"] == "pipeline_item_embedding"}
    assert runs["plain"]["image_workers"] == 0 and runs["project"]["image_workers"] == 2
    assert runs["plain"]["batch"] == 32 and runs["project"]["batch"] == 128
    ratio, = [x for x in rows if x["figure"] == "pipeline_item_embedding_ratio"]
    assert ratio["max_rel_diff"] <= 1e-4  # fp32 on the CPU: the same embeddings from both paths


def test_pipeline_train_bench_times_the_trainer_at_its_defaults():
    """The trainer's own steps at its defaults for a real backbone (batch 8, LoRA dropout 0.2 really
    drawing masks, the probe every 10th step): the probed step among the timed ones, the epoch
    from the mean step."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline_train.py"), "--tiny"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["figure"]: x for x in map(json.loads, (line for line in r.stdout.splitlines() if line.startswith("{")))}
    setup, steps, domain = rows["pipeline_train_setup"], rows["pipeline_train_steps"], rows["pipeline_train_domain"]
    assert (setup["batch_size"], setup["lora_dropout"], setup["grad_cos_every"]) == (8, 0.2, 10) and setup["dropout_active"]
    assert setup["cache_images"] == domain["items"] and 5 <= domain["history_mean"] <= 9
    assert steps["steps"] == 11 and steps["median_probed_step_s"] is not None  # step 10 of 0-11 probed
    # (the epoch from the unrounded mean step: 19,757 users at batch 8)
    assert abs(steps["beauty_epoch_min"] - steps["mean_step_s"] * (19_757 // 8) / 60) < 0.1
    assert steps["tokens_first_step"] > 8 * 2 * domain["history_mean"]  # (each history item's title or image at least)


def test_allreduce_bench_averages_the_lora_both_ways_alike():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "allreduce.py"), "--tiny", "--reps", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
    assert row["figure"] == "gradient_averaging" and row["processes"] == 2
    assert row["tensors"] == 2 * 7 * 2  # A and B of 7 projections in each of the tiny config's 2 layers
    assert row["max_abs_diff"] == 0.0


def test_cache_fill_bench_fills_the_cache_both_ways_alike(synth_ds, tiny_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cache_fill.py"), "--data", str(synth_ds.path), "--reps", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
    assert row["figure"] == "vision_cache_fill" and row["processes"] == 2
    assert row["images"] == int(synth_ds.items["image"].notna().sum())
    assert row["max_abs_diff"] <= 1e-5 and row["plain_s"] > 0 and row["project_s"] > 0


def test_host_cost_bench_extrapolates_its_two_token_counts_to_none():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "host_cost.py"), "--layers", "2", "--steps", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    (a, b), last = [x for x in rows if x["figure"] == "host_step"], rows[-1]
    assert (a["tokens"], b["tokens"], a["prompts"], a["layers"], last["layers"]) == (32, 64, 8, 2, 2)
    assert last["figure"] == "host_step_no_tokens"  # the line through both points, at 0 tokens
    assert last["ms"] == pytest.approx(2 * a["median_ms"] - b["median_ms"], abs=0.2)  # (each rounded to 0.1)
    assert last["ms_per_layer"] == pytest.approx(last["ms"] / 2, abs=0.04)


def test_the_device_checks_command_lines_are_valid(capsys):
    """Every command ``bench/device_check.sh`` runs names files that exist and, for ``gpu_bench.py``,
    flags and training variants the script takes: a misspelt one would cost a lent GPU's minutes."""
    import shlex

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    script = (ROOT / "bench" / "device_check.sh").read_text().replace("\\\n", " ")
    runs = [shlex.split(line.split("2>")[0].split("|")[0].split(">", 1)[0])
            for line in script.splitlines() if "python3 " in line and not line.lstrip().startswith("#")]
    runs = [r[r.index("python3") + 1:] for r in runs if "python3" in r]
    files = [a for r in runs for a in r if a.endswith(".py") or a.startswith("tests/")]
    assert files and all((ROOT / f).exists() for f in files), files
    bench = [r[1:] for r in runs if r and r[0] == "bench/gpu_bench.py"]
    assert len(bench) == 2
    for argv in bench:
        a = gpu_bench.parse_args(argv)
        assert not a.tiny and (a.train_variants is None or set(a.train_variants.split(",")) <= set(gpu_bench.TRAIN_VARIANTS))
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--train-variants", "project,project_papr"])
    assert "unknown project_papr" in capsys.readouterr().err


def test_vision_traffic_counts_fewer_bytes_with_the_rotary_stand_in():
    """The tiny vision block: the stand-in's attention moves fewer bytes than Hugging Face's (its
    fp32 copies, rotate_half and the sum are gone) and gives the same block output within bf16."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "vision_traffic.py"), "--tiny", "--repeats", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    plain, rotary = (next(x for x in rows if x["figure"] == "vision_block_traffic" and x["path"] == p) for p in ("plain", "rotary"))
    assert rotary["stand_ins"] == ["Qwen2_5_VLVisionAttention"] and not plain["stand_ins"]
    assert "cat" in plain["top"] and "addcmul_" in rotary["top"]  # (rotate_half's concatenation, the stand-in's multiply-add)
    ratio = next(x for x in rows if x["figure"] == "vision_block_traffic_ratio")
    assert ratio["traffic_ratio"] > 1.2 and ratio["saved_mb_per_image"] > 0 and ratio["max_rel_diff"] <= 2e-2
