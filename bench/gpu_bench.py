"""GPU benchmark: the plain Hugging Face path against the project's path, side by side in one run,
for Beauty-shaped item embedding and training steps on a Qwen2.5-VL-3B-shaped model with random
weights (config from code, no download). Prints one JSON line per figure, with ratios and the
projected Beauty times (9,311 items; 19,757 users per epoch at batch 8).

    python bench/gpu_bench.py            # on a GPU: the 3B shape, bf16, 224 px images (64 visual tokens)
    python bench/gpu_bench.py --tiny     # on the CPU: the same script with a tiny config (CI / tests)

The figures come from ``gpu_embedding.py`` (item and history embedding) and ``gpu_training.py``
(training steps); ``common.py`` holds the model config and timing helpers the benchmarks share.

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
import importlib.util
import json
import time

import torch
from common import model_config
from gpu_embedding import Shapes, item_embedding_figures, lora_item_embedding
from gpu_training import TRAIN_VARIANTS, TrainingBench, add_lora, set_lora_dropout


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
    import transformers
    from transformers import AutoModelForImageTextToText

    from vlm2rec_lab.backbones import Backbone

    emit = lambda **kw: print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **kw}), flush=True)  # noqa: E731
    emit(figure="env", torch=torch.__version__, transformers=transformers.__version__,
         flash_attn=importlib.util.find_spec("flash_attn") is not None)
    torch.manual_seed(0)
    cfg = model_config(a.tiny)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    emit(figure="model", params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3), init_s=round(time.perf_counter() - t0, 1))
    n_items = max(a.plain_items, a.project_items)
    shapes = Shapes(cfg, n_items, 56 if a.tiny else 224, torch.Generator().manual_seed(0), device, vary=a.vary)
    backbone = Backbone(name="bench", model=model.model, tokenizer=None, image_processor=None, kind="vlm")

    plain_rate = proj_rate = None
    if not a.train_only:
        plain_rate, proj_rate = item_embedding_figures(model, backbone, shapes, a, device, emit)
    peft = add_lora(model)
    backbone.engine.forget()  # LoRA went into backbone.model in place
    if not a.train_only:
        lora_item_embedding(backbone, peft, shapes, a, device, emit, proj_rate)

    bench = TrainingBench(model, peft, backbone, shapes, n_items, a.steps, a.vary, device, emit)
    bench.loss_agreement()
    names = a.train_variants.split(",") if a.train_variants else None
    results = bench.variants(names)
    if not names or "project_paper" in names:
        bench.longest_step()
    set_lora_dropout(peft, 0.0)
    model.model.activation_checkpointing_disable()
    bench.epoch_figures(results)
    if a.profile:
        bench.profile(dtype)
    if a.compile:  # last: compiling changes the layers in place
        bench.compiled(a.compile_backend or ("aot_eager" if a.tiny else "inductor"), results, a, plain_rate)


if __name__ == "__main__":
    main()
