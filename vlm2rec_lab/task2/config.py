"""The config of one Task 2 run (docs/method.md §4), and the names its fields take. Importing it needs no torch."""
from __future__ import annotations

from dataclasses import dataclass

MODELS = ("sasrec", "gru4rec")
LOSSES = ("ce", "bce")
INIT_TRANSFORMS = ("whiten", "standardize", "l2", "raw")
MATMUL = ("auto", "float32", "bfloat16")


@dataclass
class DownstreamConfig:
    """One Task 2 run (docs/method.md §4). ``None`` fields take the defaults listed in the comments."""

    model: str = "sasrec"
    hidden: int = 128  # the paper's hidden size
    layers: int = 2  # SASRec blocks / GRU layers
    heads: int = 2
    dropout: float = 0.5
    max_len: int | None = None  # None: the dataset's max_len
    loss: str = "ce"  # "ce": full-softmax cross-entropy; "bce": one sampled negative per position
    epochs: int = 200  # upper bound; early stopping decides
    patience: int = 5  # evaluations without a better validation NDCG@10
    eval_every: int = 1  # epochs between validations
    batch_size: int = 256  # training windows per step
    lr: float = 4e-3
    weight_decay: float = 0.0
    init_transform: str = "whiten"  # the frozen table before the Linear (ours): see models.prepare_init_table
    init_eps: float = 1.0  # ε of whiten / standardize, relative to the mean variance
    device: str | None = None  # None: cuda when available, else cpu
    matmul: str = "auto"  # precision of the training softmax's matmuls: auto, float32, bfloat16
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model: {self.model!r} is not one of {', '.join(MODELS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if min(self.hidden, self.layers, self.heads, self.epochs, self.patience, self.eval_every, self.batch_size) < 1:
            raise ValueError("hidden, layers, heads, epochs, patience, eval_every and batch_size must be >= 1")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len: {self.max_len} must be >= 1")
        if self.matmul not in MATMUL:
            raise ValueError(f"matmul: {self.matmul!r} is not one of {', '.join(MATMUL)}")
        if self.init_transform not in INIT_TRANSFORMS:
            raise ValueError(f"init_transform: {self.init_transform!r} is not one of {', '.join(INIT_TRANSFORMS)}")
        if self.init_eps <= 0:
            raise ValueError(f"init_eps: {self.init_eps} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout} is outside [0, 1)")
