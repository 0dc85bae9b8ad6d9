"""Run folders (docs/training.md): config, manifest, adapter, embeddings per modality, metrics.

    RUN/config.yaml                 the TrainConfig
    RUN/manifest.json               versions, seeds, git revision, data path and fingerprint
    RUN/adapter/, alpha_beta.json   LoRA adapter (PEFT format) and the learned α, β
    RUN/checkpoint/, logs/          resumable state; per-step logs and per-user weak modality
    RUN/embeddings/                 item_{T,V,F}.npy + item_ids.txt; seq_{split}_{T,V,F}.npy + seq_{split}_histories.npy
    RUN/metrics/                    task1_{split}.json, task1_{split}_per_seed.csv (tidy)

A run is trained with one training seed (LoRA init, data order, dropout) and evaluated on that
seed's negative set (docs/method.md §3: a seed is a training run); :mod:`vlm2rec_lab.runsets` holds one run
per training seed.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch.nn.functional as F

from .accel import distributed as dist
from .config import SpeedConfig, TrainConfig, load_yaml, save_yaml
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .methods import get_method

VIEWS = {"f2f": "F", "t2f": "T", "v2f": "V"}  # modality dropout (docs/method.md §5): history view vs fused items


class MissingViewError(ValueError):
    """A run has no embeddings for a modality-dropout view (internal fusion and text-only methods
    have f2f only)."""


def check_seed(dataset, seed: int, what: str = "a run") -> None:
    """A run of training seed s is ranked against negative set s: the dataset must have it."""
    if int(seed) not in dataset.seeds:
        raise ValueError(f"{what} of training seed {seed} is ranked against negative set {seed}, but "
                         f"{dataset.path} has negatives for seeds {list(dataset.seeds)} only "
                         f"(prepare it with --seeds, or train with those seeds)")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("vlm2rec_lab", "torch", "transformers", "peft", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_revision() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def config_diff(a: TrainConfig, b: TrainConfig) -> dict:
    """{field: (a's value, b's value)} where two configs differ."""
    return {k: (getattr(a, k), getattr(b, k)) for k in vars(a) if getattr(a, k) != getattr(b, k)}


def create_run(run_dir: str | Path, cfg: TrainConfig, dataset, resume: bool = False, fresh: bool = False) -> Path:
    """Make (or, with ``resume``, reopen) a run folder: config.yaml and manifest.json. The manifest
    records how many processes made the run (torchrun's or accelerate's world size, 1 without) and,
    for each resume, how many continued it (``resumed_with_processes``). ``resume`` where no run is
    raises :class:`~vlm2rec_lab.checkpoint.ResumeError` unless ``fresh`` (then it makes one)."""
    run = Path(run_dir)
    cfg = cfg.resolved()
    if resume and not fresh and not (run / "config.yaml").exists():
        from .checkpoint import ResumeError

        raise ResumeError(f"{run}: --resume, but no run is here (no config.yaml): check --out, or add --fresh to start it")
    if (run / "config.yaml").exists():
        if not resume:
            raise FileExistsError(f"{run}: a run already exists here (pass --resume to continue it, or another --out)")
        old = load_run_config(run)
        # where and whether compiled it computes is not what the run is (the step log's "compiled" says which)
        same_place = dataclasses.replace(cfg, device=old.device, speed=dataclasses.replace(cfg.speed, compile=old.speed.compile))
        if old != same_place:
            diff = config_diff(old, same_place)
            raise ValueError(f"{run}: --resume with a different config: {diff}")
        manifest = load_manifest(run)
        manifest["resumed_with_processes"] = manifest.get("resumed_with_processes", []) + [dist.world_size()]
        atomic_write_json(run / "manifest.json", manifest)
        return run
    run.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run / "config.yaml")
    backbone_path = None
    if cfg.backbone == "tiny":  # built for this dataset: other datasets (cross-domain) must reuse it
        from .tiny import build_tiny

        backbone_path = str(build_tiny(dataset))
    atomic_write_json(run / "manifest.json", {
        "method": cfg.method, "seed": cfg.seed, "versions": _versions(), "git_revision": _git_revision(),
        "backbone_path": backbone_path, "processes": dist.world_size(),
        "data": {"path": str(Path(dataset.path).resolve()) if dataset.path else None, "fingerprint": dataset.fingerprint,
                 "name": dataset.manifest.get("name")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return run


def load_run_config(run_dir: str | Path) -> TrainConfig:
    return load_yaml(TrainConfig, Path(run_dir) / "config.yaml")


def load_manifest(run_dir: str | Path) -> dict:
    f = Path(run_dir) / "manifest.json"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no manifest.json)")
    return json.loads(f.read_text())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- embedding a run


def load_run_backbone(run_dir: str | Path, dataset, device=None):
    """The run's backbone with its trained adapter (if any) loaded, in eval mode."""
    from peft import PeftModel

    from .backbones import load_backbone

    cfg = load_run_config(run_dir)
    name = load_manifest(run_dir).get("backbone_path") or cfg.backbone
    backbone = load_backbone(name, device=device or cfg.device, dataset=dataset, chat_template=cfg.chat_template,
                             max_pixels=cfg.max_pixels)
    adapter = Path(run_dir) / "adapter"
    if get_method(cfg.method).trains:
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"{run_dir}: method {cfg.method} trains, but no adapter was saved (train it first)")
        check_adapter(adapter)
        backbone.model = PeftModel.from_pretrained(backbone.model, adapter).eval()
    return backbone


def check_adapter(adapter: Path) -> None:
    """Raise :class:`~vlm2rec_lab.checkpoint.CheckpointError` naming the file unless ``adapter`` holds a
    readable PEFT config and a whole weights file (safetensors checks at open that its header's
    tensors cover the file: a truncated file is refused there, before PEFT reads the weights)."""
    from safetensors import safe_open

    from .checkpoint import CheckpointError

    try:
        json.loads((adapter / "adapter_config.json").read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{adapter / 'adapter_config.json'}: unreadable ({e}); train the run again") from None
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{adapter}: no adapter_model.safetensors beside adapter_config.json (the weights "
                              f"are missing); train the run again, or copy the whole adapter folder")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError  # noqa: BLE001
        raise CheckpointError(f"{weights}: unreadable (truncated or corrupt: {' '.join(str(e).split())[:200]}); "
                              f"train the run again") from None


def embed_run(run_dir: str | Path, dataset=None, splits=("test",), backbone=None, progress: bool = True,
              batch_size: int = 128, root: str | Path | None = None, compile: bool | str = False,
              device: str | None = None) -> dict[str, np.ndarray]:
    """Item and sequence embeddings per modality (T, V, F) into ``RUN/embeddings``.

    F is T + V for external fusion (and item-mean), the interleaved prompt for internal fusion, T
    for text-only methods. ``item-mean`` takes the zero-shot fused item embeddings and mean-pools
    them over each history. ``compile``: ``torch.compile`` the decoder layers and, for VLMs, the
    vision blocks first (True: inductor; or a backend's name).
    ``device``: where to embed (default: the run's config, else the GPU when there is one). Under a
    launcher only rank 0 shows progress."""
    from .data.dataset import Dataset
    from .accel.compile import compile_layers
    from .encoder import Encoder

    run = Path(run_dir)
    manifest = load_manifest(run)
    cfg = load_run_config(run)
    method = get_method(cfg.method)
    ds = dataset or Dataset.load(manifest["data"]["path"])
    if ds.fingerprint != manifest["data"]["fingerprint"] and root is None:
        raise ValueError(f"{run}: dataset fingerprint differs from the one the run was made with "
                         f"(for another domain use cross_domain())")
    backbone = backbone or load_run_backbone(run, ds, device=device)
    progress = progress and dist.rank() == 0
    from .train import check_fusion

    check_fusion(method, backbone)
    backbone.model.eval()
    if compile:
        compile_layers(backbone, backend="inductor" if compile is True else compile, vision=backbone.kind == "vlm")
    enc = Encoder(backbone, ds.items, SpeedConfig(cache_vision=cfg.speed.cache_vision, fused=cfg.speed.fused), batch_size=batch_size)
    kinds = {"external": ("T", "V"), "item-mean": ("T", "V"), "internal": ("I",), "text": ("T",)}[method.fusion]
    out: dict[str, np.ndarray] = {}

    def sharded(fn, n: int):  # each process embeds its share; all rows come back in order
        part = dist.shard(n)
        return dist.gather_shards(fn(part), n)

    items = {k: sharded(lambda part, k=k: enc.item_embeddings(k, list(part), progress=progress, desc=f"items {k}"),
                        ds.n_items) for k in kinds}
    if method.fusion in ("external", "item-mean"):
        items["F"] = items["T"] + items["V"]
    else:
        items["F"] = items[kinds[0]]
        if method.fusion == "internal":
            del items["I"]
    folder = Path(root or run) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    if dist.rank() == 0:
        atomic_write_text(folder / "item_ids.txt", "\n".join(ds.items["item_id"].astype(str)) + "\n")
    for k, v in items.items():
        out[f"item_{k}"] = v.numpy().astype(np.float32)
    for split in splits:
        hist = ds.histories(split)
        out[f"seq_{split}_histories"] = hist
        if method.fusion == "item-mean":
            e = F.normalize(items["F"], dim=-1).numpy()
            mask = hist >= 0
            pooled = (e[np.where(mask, hist, 0)] * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            out[f"seq_{split}_F"] = pooled.astype(np.float32)
            continue
        seq = {k: sharded(lambda part, k=k: enc.sequence_embeddings(k, hist[part.start:part.stop], progress=progress,
                                                                 desc=f"{split} histories {k}"), len(hist)) for k in kinds}
        if method.fusion == "external":
            seq["F"] = seq["T"] + seq["V"]
        else:
            seq["F"] = seq.pop(kinds[0])
        for k, v in seq.items():
            out[f"seq_{split}_{k}"] = v.numpy().astype(np.float32)
    if dist.rank() == 0:
        for name, arr in out.items():
            _save_npy(folder / f"{name}.npy", arr)
    dist.barrier()
    return out


def cross_domain(run_dir: str | Path, dataset, name: str | None = None, progress: bool = False,
                 seeds=None) -> dict:
    """Table 6, zero-shot cross-domain: embed another prepared dataset (its own items) with this run's
    backbone and adapter, and evaluate it (on the run's own seed's negative set of that dataset,
    unless ``seeds``). Written under RUN/cross/<name>/."""
    root = Path(run_dir) / "cross" / (name or dataset.manifest.get("name") or "other")
    embed_run(run_dir, dataset, splits=("test",), progress=progress, root=root)
    return evaluate_run(run_dir, dataset, root=root, seeds=seeds)


def load_embeddings(run_dir: str | Path, name: str) -> np.ndarray:
    f = Path(run_dir) / "embeddings" / f"{name}.npy"
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found; run `vlm2rec-lab embed {run_dir}` first")
    return np.load(f)


# --------------------------------------------------------------------------- scoring and evaluation


def evaluate_run(run_dir: str | Path, dataset=None, split: str = "test", seeds=None, full_ranking: bool = False,
                 progress: bool = False, root: str | Path | None = None) -> dict:
    """Task 1 metrics of a run: f2f (the method's own scores) and the modality-dropout views t2f,
    v2f where the method has separate text and image embeddings. Writes RUN/metrics/.

    ``seeds``: the negative sets to rank against; by default the run's own training seed's (run s
    on negative set s, docs/method.md §3). Other negative sets measure only the sampling of negatives."""
    from .data.dataset import Dataset
    from .evaluate import evaluate
    from .scorers import EmbeddingScorer

    run = Path(run_dir)
    manifest = load_manifest(run)
    ds = dataset or Dataset.load(manifest["data"]["path"])
    if seeds is None:
        seeds = [int(load_run_config(run).seed)]
        check_seed(ds, seeds[0], f"{run}, a run")
    run = Path(root or run)
    hist = load_embeddings(run, f"seq_{split}_histories")
    item_f = load_embeddings(run, "item_F")
    results, tidy = {}, []
    for view, m in VIEWS.items():
        f = run / "embeddings" / f"seq_{split}_{m}.npy"
        if not f.exists():
            continue
        scorer = EmbeddingScorer(hist, np.load(f), item_f, name=view)
        ev = evaluate(ds, scorer, split=split, seeds=seeds, full_ranking=full_ranking, name=view, progress=progress)
        results[view] = ev.to_dict()
        for which in ("sampled", "full"):
            df = getattr(ev, which)
            if df is None:
                continue
            for seed, row in df.iterrows():
                tidy += [{"method": manifest["method"], "view": view, "protocol": which, "split": split, "seed": seed,
                          "metric": k, "value": v} for k, v in row.items()]
    out = {"method": manifest["method"], "split": split, "views": results}
    (run / "metrics").mkdir(exist_ok=True)
    atomic_write_json(run / "metrics" / f"task1_{split}.json", out)
    atomic_write_text(run / "metrics" / f"task1_{split}_per_seed.csv", pd.DataFrame(tidy).to_csv(index=False))
    return out


def run_method(dataset, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
               backbone=None, train_only: bool = False, embeddings_from: str | Path | None = None,
               fresh: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train (when the method trains), embed and evaluate one run: one training seed of a Task 1 row,
    ranked against that seed's negative set. Returns its Task 1 results (``{}`` with ``train_only``,
    which neither embeds nor evaluates). Under a launcher every process trains and embeds its share
    and rank 0 makes the folder and evaluates (the others return ``{}``).

    ``embeddings_from``: a zero-shot method's run of another seed whose embeddings are the same
    model's, copied instead of embedding again. ``resume``, ``fresh``: see :func:`create_run`.
    ``log`` (rank 0 only) receives a line after training and one per evaluated view."""
    import shutil

    from .train import Trainer

    method = get_method(cfg.method)
    if not train_only:
        check_seed(dataset, cfg.seed, f"{run_dir}, a run")
    run = Path(run_dir)
    say = log if log is not None and dist.rank() == 0 else (lambda line: None)
    copied = embeddings_from is not None and not method.trains
    if dist.rank() == 0:
        create_run(run, cfg, dataset, resume=resume, fresh=fresh)
        if copied:
            shutil.copytree(Path(embeddings_from) / "embeddings", run / "embeddings", dirs_exist_ok=True)
    dist.barrier()
    if method.trains:
        trainer = Trainer(cfg, dataset, run, backbone=backbone, progress=progress)
        last = trainer.train(resume=resume, fresh=fresh)
        say(f"trained {cfg.method} (seed {cfg.seed}) for {trainer.step} steps -> {run}; last step: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
        backbone = trainer.backbone
        backbone.model.eval()
    if train_only:
        return {}
    if not copied:
        embed_run(run, dataset, backbone=backbone, progress=progress)
    if dist.rank() != 0:
        return {}
    results = evaluate_run(run, dataset)
    for view, res in results["views"].items():
        say(f"{view} (seed {cfg.seed}'s negatives): "
            + ", ".join(f"{k} {v:.4f}" for k, v in res["sampled"]["mean"].items()))
    return results


def is_finished(run_dir: str | Path, cfg: TrainConfig, dataset) -> bool:
    """Whether a run folder holds a finished, evaluated run of ``cfg`` on ``dataset``."""
    run = Path(run_dir)
    return ((run / "metrics" / "task1_test.json").exists() and (run / "config.yaml").exists()
            and load_run_config(run) == cfg.resolved() and _run_fingerprint(run) == dataset.fingerprint)


def ensure_run(dataset, cfg: TrainConfig, run_dir: str | Path, progress: bool = False,
               embeddings_from: str | Path | None = None) -> dict:
    """The Task 1 results of a run, reusing a finished run folder with the same config (notebooks
    share runs this way); otherwise train, embed and evaluate it afresh."""
    import shutil

    run = Path(run_dir)
    if is_finished(run, cfg, dataset):
        return json.loads((run / "metrics" / "task1_test.json").read_text())
    if run.exists():
        shutil.rmtree(run)
    return run_method(dataset, cfg, run, progress=progress, embeddings_from=embeddings_from)


def _run_fingerprint(run: Path) -> str | None:
    """The data fingerprint a run folder was made with (None when it has no readable manifest)."""
    try:
        return load_manifest(run)["data"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
