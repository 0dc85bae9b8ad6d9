"""Typed configs for every job; YAML in and out. Converted once at the edge (CLI, notebooks)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

FORMATS = ("amazon2018", "amazon2014", "ratings-csv", "atomic", "p5")
TRAIN_EXAMPLES = ("last", "all_prefixes")


def require_positive(cfg, names: tuple[str, ...]) -> None:
    """Raise naming the first of ``names`` below 1, as its flag and its field."""
    for n in names:
        v = getattr(cfg, n)
        if v < 1:
            raise ValueError(f"--{n.replace('_', '-')} ({type(cfg).__name__}.{n}) must be at least 1, got {v}")


@dataclass
class PrepareConfig:
    """How raw interaction files become a processed dataset (docs/data.md)."""

    format: str
    inputs: list[str]
    images: str | None = None  # local folder of images named by item id; else URLs from the meta
    image_cache: str | None = None  # where fetched URL images are cached (default ~/.cache/vlm2rec_lab/images)
    require_images: bool = True
    require_titles: str = "auto"  # "auto": required when the input carries item text; "yes" / "no"
    k_core: int = 5
    max_len: int = 10
    max_title_tokens: int = 32  # whitespace tokens (ours: no tokenizer exists at prepare time)
    train_examples: str = "last"
    num_negatives: int = 100
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    skip_bad_lines: bool = False
    max_pixels: int = 448 * 448
    offline: bool = False
    integer_ids: bool = False  # p5 only: every id an integer (P5's indexed files); else raw ids too

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.train_examples not in TRAIN_EXAMPLES:
            raise ValueError(f"train_examples: {self.train_examples!r} is not one of {TRAIN_EXAMPLES}")
        if self.require_titles not in ("auto", "yes", "no"):
            raise ValueError(f"require_titles: {self.require_titles!r} is not auto, yes or no")
        require_positive(self, ("k_core", "max_len", "num_negatives", "max_title_tokens"))
        if not self.inputs:
            raise ValueError("inputs: at least one input path is needed")
        self.inputs = [str(p) for p in self.inputs]
        self.seeds = tuple(int(s) for s in self.seeds)


@dataclass
class SynthConfig:
    """The planted-modality synthetic domain (docs/data.md). The defaults plant modality collapse
    (``data/synthetic.py`` explains the mechanism); ``REGIMES["independent"]`` gives the earlier
    domain of two independent latents, where SFT leaves the image weak but does not collapse it."""

    users: int = 1000
    items: int = 500
    categories: int = 8  # latent shown by the title's words
    styles: int = 8  # latent shown by the image (colour x shape)
    text_signal: float = 1.0  # share of items whose title shows their true category
    image_signal: float = 0.7  # share of items whose image shows their true style
    stay: float = 0.8  # chance a latent keeps its value from one item to the next
    noise: float = 0.1  # chance the next item is drawn uniformly, ignoring the latents
    shared: float = 1.0  # share of items whose style is tied to their category (one latent, one chain)
    shortcut: float = 0.0  # chance the next item is the current item's series partner (a code in both titles)
    min_len: int = 5
    mean_len: float = 9.0
    image_size: int = 64
    seed: int = 0
    name: str = "Synthetic"
    vocab_seed: int | None = None  # category vocabulary; defaults to seed (new seed => new words)

    def __post_init__(self):
        for k in ("text_signal", "image_signal", "stay", "noise", "shared", "shortcut"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k}: {v} is outside [0, 1]")
        if self.users < 1 or self.items < 2 or self.categories < 2 or self.styles < 2:
            raise ValueError("need users >= 1, items >= 2, categories >= 2, styles >= 2")
        if self.shared > 0 and self.styles != self.categories:
            raise ValueError(f"shared: {self.shared} ties each style to a category, which needs styles == categories "
                             f"(got {self.styles} styles, {self.categories} categories; set both, or shared 0: --shared 0 or "
                             f"--regime independent)")
        if self.styles > 16:
            raise ValueError("styles: at most 16 (4 shapes x 4 colours)")
        if self.min_len < 3:
            raise ValueError("min_len: at least 3 (leave-one-out needs train, valid and test)")


# named settings of the domain's mechanism knobs (sizes and seed are set apart)
REGIMES = {
    "collapse": {},  # the defaults: one latent shown cleanly by the title, noisily by the image
    "independent": {"image_signal": 1.0, "stay": 0.5, "shared": 0.0},  # two independent latents, one per modality
}


T = TypeVar("T")


def parse_seeds(spec: str | int | list) -> list[int]:
    """Seeds from ``0-4``, ``0,2,3``, ``1-2,5``, one int, or a list: ``"0-2,5"`` -> [0, 1, 2, 5]."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [int(s) for s in spec]
    out: list[int] = []
    try:
        for part in str(spec).replace(" ", "").split(","):
            if "-" in part:
                a, b = part.split("-")
                if int(b) < int(a):
                    raise ValueError(f"seeds: the range {part!r} runs backwards (write {b}-{a})")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        if "backwards" in str(e):
            raise
        raise ValueError(f"seeds: expected e.g. 0-4 or 0,2,3, got {spec!r}") from None
    if not out:
        raise ValueError(f"seeds: no seed in {spec!r}")
    if len(set(out)) < len(out):
        raise ValueError(f"seeds: {spec!r} lists a seed twice")
    return out


def to_dict(cfg) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls`` from a mapping of its fields; a TrainConfig written before the speed switches had a
    section of their own (``TrainConfig.speed``) has them at the top level: moved there."""
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is TrainConfig and any(k in data for k in LEGACY_SPEED_KEYS):
        data = dict(data)
        speed = dict(data.pop("speed", None) or {})
        both = sorted(k for k in LEGACY_SPEED_KEYS if k in data and k in speed)
        if both:
            raise ValueError(f"TrainConfig: {both} given both at the top level and under speed: keep one")
        speed.update({k: data.pop(k) for k in LEGACY_SPEED_KEYS if k in data})
        data["speed"] = speed
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    return cls(**data)


def save_yaml(cfg, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return from_dict(cls, data)


AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # the words of three-way settings (CLI, YAML)

# Where the paper's defaults (lr 1e-5, batch 8, 3 epochs, LoRA dropout 0.2) cannot train the tiny
# CPU backbone in minutes, the embedded default uses these (ours; measured on the synthetic domain).
PAPER_DEFAULTS = {"lr": 1e-5, "batch_size": 8, "epochs": 3, "lora_dropout": 0.2}
TINY_DEFAULTS = {"lr": 1e-3, "batch_size": 16, "epochs": 8, "lora_dropout": 0.0}


@dataclass
class SpeedConfig:
    """How fast a run computes, never what it computes: the switches of :mod:`vlm2rec_lab.accel`.
    With every switch off the plain Hugging Face forward runs; on, the same embeddings and losses
    up to float rounding (tested)."""

    packed: bool = True  # a step's prompt sets in one forward without padding, where the backbone can
    share_prefix: bool | None = None  # packed prompts' common leading tokens once; None: not under LoRA dropout
    cache_vision: bool = True  # each image through the (frozen) vision tower once
    fused: bool = True  # fused stand-ins (LoRA, RMSNorm, patch embedding) and autocast on a GPU
    merge_adapters: bool = True  # embedding without gradients: LoRA updates merged into their weights
    compile: bool | str | None = None  # torch.compile the decoder layers: None auto, True on, False off, or a backend
    gradient_checkpointing: int = 0  # checkpoint every n-th decoder layer from the start; 0: once memory runs out
    image_workers: int | None = None  # threads reading images ahead; None: the usable cores, at most 8; 0: none

    def __post_init__(self):
        self.gradient_checkpointing = int(self.gradient_checkpointing)  # (True / False from older configs: 1 / 0)
        if self.gradient_checkpointing < 0:
            raise ValueError(f"gradient_checkpointing: every n-th layer, n >= 1 (0: off), not {self.gradient_checkpointing}")
        if isinstance(self.compile, str):  # auto / on / off (any case), else a backend's name
            self.compile = AUTO_ON_OFF.get(self.compile.strip().lower(), self.compile)
        if not (self.compile is None or isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile: auto, on, off or a torch.compile backend's name, not {self.compile!r}")


# TrainConfig's fields before the speed switches had a section of their own (SpeedConfig)
LEGACY_SPEED_KEYS = ("gradient_checkpointing", "cache_vision", "packed", "share_prefix", "compile")


@dataclass
class TrainConfig:
    """One training (or zero-shot) run of a named method (docs/method.md §2).

    ``None`` for lr, batch_size, epochs and lora_dropout means the paper's defaults for a real
    backbone and :data:`TINY_DEFAULTS` for ``tiny``; :meth:`resolved` fills them in.
    """

    method: str = "vlm2rec"
    backbone: str = "tiny"  # "tiny", a Hugging Face id, or a local path
    epochs: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs together)
    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    seed: int = 0
    users_k: int | None = None  # few-shot: train on K users sampled with the seed
    train_examples: str | None = None  # None: the dataset's ("last" or "all_prefixes")
    weight_decay: float = 0.0
    tau: float = 0.1  # τ_WPCL / InfoNCE
    tau_crtr: float = 0.1
    lam: float = 0.5
    alpha: float = 1.0
    beta: float = 1.0
    learn_alpha_beta: bool = True
    penalty_offset: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float | None = None
    checkpoint_every: int = 50
    grad_cos_every: int = 10  # gradient-cosine probe every M steps (0: never)
    device: str | None = None
    chat_template: bool = True
    max_pixels: int | None = None  # largest image the processor keeps, in pixels (224 * 224 = 64 visual tokens
    #                                in Qwen2.5-VL); None: the backbone's own policy (Qwen's: up to 12.8 MP)
    speed: SpeedConfig = dataclasses.field(default_factory=SpeedConfig)  # how fast (accel), never what

    def __post_init__(self):
        from .methods import get_method

        get_method(self.method)
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 2) \
                or self.grad_accum < 1:
            raise ValueError("epochs >= 1, batch_size >= 2 (in-batch negatives) and grad_accum >= 1 are needed")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0 (a negative alpha flips the penalty), got {self.alpha}, {self.beta}")
        if isinstance(self.speed, dict):  # (from YAML)
            self.speed = from_dict(SpeedConfig, self.speed)
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels, not {self.max_pixels}")
        if self.train_examples is not None and self.train_examples not in TRAIN_EXAMPLES:
            raise ValueError(f"train_examples: {self.train_examples!r} is not one of {TRAIN_EXAMPLES}")

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in (paper's, or the tiny backbone's)."""
        base = TINY_DEFAULTS if self.backbone == "tiny" else PAPER_DEFAULTS
        return dataclasses.replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})
