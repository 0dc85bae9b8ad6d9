"""Named method configs for the Task 1 table (paper Table 2 / Table 5 rows).

``fusion``: ``external`` (text and image prompts, summed, Eq. 2), ``internal`` (one interleaved
prompt), ``text`` (titles only: the LLM baselines, the text half of the same backbone), or
``item-mean`` (zero-shot fused item embeddings mean-pooled over the history).
``objective``: None for zero-shot methods, else a :mod:`vlm2rec_lab.losses` objective.
"""
from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("F", "T", "V")  # the embeddings of a run: fused (F), text (T), image (V)


@dataclass(frozen=True)
class Method:
    name: str
    fusion: str
    objective: str | None = None

    @property
    def trains(self) -> bool:
        return self.objective is not None


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("vlm-vanilla-external", "external"),
    Method("vlm-vanilla-internal", "internal"),
    Method("vlm-sft-external", "external", "sft"),
    Method("vlm-sft-internal", "internal", "sft"),
    Method("vlm2rec", "external", "vlm2rec"),
    Method("vlm2rec-no-stopgrad", "external", "no_stopgrad"),
    Method("vlm2rec-no-penalty", "external", "no_penalty"),
    Method("vlm2rec-no-crtr", "external", "no_crtr"),
    Method("vlm2rec-crtr-only", "external", "crtr_only"),
    Method("llm-vanilla", "text"),
    Method("llm-sft", "text", "sft"),
    Method("item-mean", "item-mean"),
]}
ALIASES = {"vlm-vanilla": "vlm-vanilla-external", "vlm-sft": "vlm-sft-external"}


def get_method(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join([*METHODS, *ALIASES])}")
    return METHODS[name]
