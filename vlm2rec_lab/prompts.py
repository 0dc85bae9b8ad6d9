"""Prompts of §2.2.1 (docs/method.md §1). ``IMAGE`` marks where an image goes; the backbone replaces it with
its own vision tokens (for Qwen2.5-VL ``<|vision_start|><|image_pad|><|vision_end|>``)."""
from __future__ import annotations

from typing import Sequence

IMAGE = "<image>"
TEXT_HEAD = "Describe this item text sequence in one word, "
IMAGE_HEAD = "Describe this item image sequence in one word, "
INTERLEAVED_HEAD = "Describe this item sequence in one word, "
KINDS = ("T", "V", "I")  # text, image, interleaved ("internal fusion")


def sequence_prompt(kind: str, titles: Sequence[str]) -> str:
    """The prompt for a history (or, with one title, an item: the same template at index 0).

    ``kind``: ``T`` lists the titles, ``V`` lists one image per item, ``I`` interleaves title and image.

    >>> sequence_prompt("T", ["a", "b"])
    'Describe this item text sequence in one word, 0) a, 1) b'
    >>> sequence_prompt("V", ["a", "b"])
    'Describe this item image sequence in one word, 0) <image>, 1) <image>'
    """
    if kind == "T":
        return TEXT_HEAD + ", ".join(f"{k}) {t}" for k, t in enumerate(titles))
    if kind == "V":
        return IMAGE_HEAD + ", ".join(f"{k}) {IMAGE}" for k in range(len(titles)))
    if kind == "I":
        return INTERLEAVED_HEAD + ", ".join(f"{k}) {t} {IMAGE}" for k, t in enumerate(titles))
    raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")


def prompt_words() -> list[str]:
    """Every fixed word the prompts use (the tiny backbone's tokenizer is trained on these too)."""
    return [TEXT_HEAD, IMAGE_HEAD, INTERLEAVED_HEAD, ", ".join(f"{k})" for k in range(64))]
