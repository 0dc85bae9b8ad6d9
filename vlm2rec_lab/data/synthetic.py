"""The synthetic planted-modality domain: the embedded default dataset (docs/data.md).

Every item has two latents: a *category*, shown by words in its title, and a *style*, shown by its
image (a shape in a colour). Users move from item to item by Markov chains on the latents: a latent
keeps its value with probability ``stay`` or moves to a fixed successor; the next item is then drawn
(by popularity) among the unseen items with the chosen (category, style), or with probability
``noise`` uniformly at random. One generative process writes every sequence; the splits are cut
from them afterwards (leave-one-out).

The knobs (:class:`~vlm2rec_lab.config.SynthConfig`), each an instrument setting:

* ``text_signal`` / ``image_signal``: the share of items whose title / image shows the *true*
  latent; the others show a random one (0: the modality carries no next-item signal at all).
* ``shared`` (ρ): the share of items whose style is *tied* to their category (style = category),
  the rest drawing a style at random; with ρ > 0 the two latents move by one chain (one stay-or-move
  decision, the same successor map), so a tied item's title and photo describe the same thing, as
  on real products. ρ = 0 gives two independent latents with independent chains.
* ``shortcut`` (σ): items come in *series pairs* whose titles both end with the pair's made-up
  code; with chance σ the next item is the current item's partner (while unseen). An item-level
  text shortcut: the title shows it, the image cannot.

**The default regime plants modality collapse** (ours; chosen from oracle, vanilla and SFT runs
only, see docs/results.md): ρ = 1, ``stay`` 0.8, ``text_signal`` 1, ``image_signal`` 0.7. The title
shows the one latent cleanly and the image shows it for 70% of items, so the image is a weaker,
redundant view: its oracle is well above chance (a signal that generalises), but once the text has
learned the latent, the mis-shown images are only noise to the fused objective. Plain contrastive
fine-tuning then learns the text, spreads the text embeddings and *shrinks* the image embeddings'
spread (they collapse towards one vector), so the image-only history ranks below the untrained
model's (v2f), and the fused space mirrors the text space (t2f ≈ f2f).
``config.REGIMES["independent"]`` (ρ = 0, ``stay`` 0.5, ``image_signal`` 1) is the earlier
default: the same reviews, titles and images byte for byte (``oracle/latents.json`` gains the new
knobs and ``partner``): two independent latents, where SFT leaves the image weak but not collapsed.
Any ρ > 0 switches to the one chain, so ρ → 0⁺ does not approach ρ = 0.

The output is Amazon 2018 raw data (reviews and ``meta_*`` JSON lines, gzip) plus PNG images named
by item id, so it goes through the same readers as real data, and ``oracle/latents.json`` with the known
latents, from which :class:`OracleScorer` gives the best ranking each modality alone allows.
Same config => byte-identical files.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..config import SynthConfig, to_dict
from ..io import atomic_dir

LATENTS = "oracle/latents.json"
_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
_SHAPES = ("circle", "square", "triangle", "cross")
_COLOURS = {"red": (205, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "orange": (235, 150, 20)}
_ADJECTIVES = (
    "classic", "premium", "compact", "deluxe", "everyday", "gentle", "bold", "soft", "pro", "mini",
    "ultra", "fresh", "natural", "smart", "travel", "essential", "original", "advanced", "daily", "lite",
)


def _word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables))


def _vocabulary(cfg: SynthConfig) -> tuple[list[list[str]], list[str]]:
    """Category nouns (three per category) and brand names, all distinct, from ``vocab_seed``."""
    rng = np.random.default_rng(10_000 + (cfg.seed if cfg.vocab_seed is None else cfg.vocab_seed))
    used: set[str] = set(_ADJECTIVES)
    words: list[str] = []
    while len(words) < 3 * cfg.categories + 24:
        word = _word(rng, int(rng.integers(2, 4)))
        if word not in used:
            used.add(word)
            words.append(word)
    nouns = [words[3 * c:3 * c + 3] for c in range(cfg.categories)]
    brands = [word.capitalize() for word in words[3 * cfg.categories:]]
    return nouns, brands


def _successor(rng: np.random.Generator, n_states: int) -> np.ndarray:
    """A random cyclic permutation: every state moves to a different one."""
    order = rng.permutation(n_states)
    successor = np.empty(n_states, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    return successor


def transition_matrix(successor: np.ndarray, stay: float) -> np.ndarray:
    """T[a, b] = P(next latent = b | latent = a) = stay·1[a=b] + (1 − stay)·1[b = succ(a)]."""
    n_states = successor.size
    T = stay * np.eye(n_states)
    T[np.arange(n_states), successor] += 1.0 - stay
    return T


def _series_codes(rng: np.random.Generator, n: int, partner: np.ndarray, taken: set[str]) -> list[str]:
    """One made-up series code per pair of partners (shared by both titles), "" for items without one."""
    codes = [""] * n
    if (partner > np.arange(n)).sum() > 100_000:
        raise ValueError(f"items: {n} is too many for series codes (at most 200,000 items with shortcut > 0)")
    used = set(taken) | set(_ADJECTIVES)
    for k in range(n):
        if partner[k] > k:
            while (word := _word(rng, 3)) in used:
                pass
            used.add(word)
            codes[k] = codes[partner[k]] = word.upper()
    return codes


def _draw_image(rng: np.random.Generator, style: int, size: int) -> Image.Image:
    shape = _SHAPES[style % 4]
    colour = list(_COLOURS.values())[style // 4]
    background = tuple(int(channel) for channel in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # grey distractor dots
        dot_x, dot_y = (int(value) for value in rng.integers(0, size, size=2))
        grey = int(rng.integers(120, 200))
        draw.ellipse([dot_x, dot_y, dot_x + 3, dot_y + 3], fill=(grey, grey, grey))
    radius = int(size * rng.uniform(0.22, 0.32))
    centre_x, centre_y = (int(value) for value in rng.integers(radius + 2, size - radius - 2, size=2))
    box = [centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(centre_x, centre_y - radius), (centre_x - radius, centre_y + radius),
                      (centre_x + radius, centre_y + radius)], fill=colour)
    else:
        bar = max(2, radius // 3)
        draw.rectangle([centre_x - radius, centre_y - bar, centre_x + radius, centre_y + bar], fill=colour)
        draw.rectangle([centre_x - bar, centre_y - radius, centre_x + bar, centre_y + radius], fill=colour)
    return image


def _gzip_lines(records: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gzip_file:
        for record in records:
            gzip_file.write(json.dumps(record, sort_keys=True).encode() + b"\n")
    return buffer.getvalue()


def generate(cfg: SynthConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Write the synthetic domain as Amazon 2018 raw files + PNG images + ``oracle/latents.json``."""
    rng = np.random.default_rng(cfg.seed)
    nouns, brands = _vocabulary(cfg)
    n_items, n_categories, n_styles = cfg.items, cfg.categories, cfg.styles

    # latents, balanced; what each modality shows
    category = rng.permutation(np.arange(n_items) % n_categories)
    style = rng.permutation(np.arange(n_items) % n_styles)
    side_rng = np.random.default_rng([cfg.seed, 1])  # the shared latent's and the shortcut's draws (none at 0)
    if cfg.shared > 0:  # tied items show their category as their style too (categories == styles)
        style = np.where(side_rng.random(n_items) < cfg.shared, category, style)
    shows_category = rng.random(n_items) < cfg.text_signal
    shows_style = rng.random(n_items) < cfg.image_signal
    shown_category = np.where(shows_category, category, rng.integers(0, n_categories, size=n_items))
    shown_style = np.where(shows_style, style, rng.integers(0, n_styles, size=n_items))
    popularity = rng.lognormal(0.0, 1.0, size=n_items)
    category_successor, style_successor = _successor(rng, n_categories), _successor(rng, n_styles)
    if cfg.shared > 0:  # one chain: the style moves as the category does
        style_successor = category_successor.copy()
    partner = np.full(n_items, -1)
    if cfg.shortcut > 0:  # series pairs: two items that share a series code in their titles
        order = side_rng.permutation(n_items)
        partner[order[0:n_items - 1:2]], partner[order[1:n_items:2]] = order[1:n_items:2], order[0:n_items - 1:2]
    taken_words = {brand.lower() for brand in brands} | {noun for category_nouns in nouns for noun in category_nouns}
    codes = _series_codes(side_rng, n_items, partner, taken_words)
    asins = [f"S{cfg.seed:02d}{k:06d}" for k in range(n_items)]

    cells: dict[tuple[int, int], np.ndarray] = {}
    for k in range(n_items):
        cells.setdefault((int(category[k]), int(style[k])), []).append(k)
    cells = {key: np.array(members) for key, members in cells.items()}

    # sequences
    reviews = []
    start_time = 1514764800  # 2018-01-01
    for user_index in range(cfg.users):
        length = cfg.min_len + int(rng.geometric(1.0 / max(1.0, cfg.mean_len - cfg.min_len + 1))) - 1
        length = min(length, n_items // 2)
        seen: set[int] = set()
        current = int(rng.choice(n_items, p=popularity / popularity.sum()))
        time = start_time + int(rng.integers(0, 365)) * 86400
        user = f"U{cfg.seed:02d}{user_index:06d}"
        for pos in range(length):
            if pos:
                next_item = None
                if (cfg.shortcut > 0 and partner[current] >= 0 and partner[current] not in seen
                        and side_rng.random() < cfg.shortcut):
                    next_item = int(partner[current])
                elif rng.random() >= cfg.noise:
                    if cfg.shared > 0:  # one stay-or-move decision for both latents
                        keep = rng.random() < cfg.stay
                        next_category = int(category[current]) if keep else int(category_successor[category[current]])
                        next_style = int(style[current]) if keep else int(style_successor[style[current]])
                    else:
                        next_category = (int(category[current]) if rng.random() < cfg.stay
                                         else int(category_successor[category[current]]))
                        next_style = int(style[current]) if rng.random() < cfg.stay else int(style_successor[style[current]])
                    pool = [k for k in cells.get((next_category, next_style), ()) if k not in seen]
                    if pool:
                        weights = popularity[pool]
                        next_item = int(rng.choice(pool, p=weights / weights.sum()))
                if next_item is None:
                    pool = np.setdiff1d(np.arange(n_items), list(seen))
                    next_item = int(rng.choice(pool))
                current = next_item
                time += int(rng.choice([0, 86400, 2 * 86400, 7 * 86400], p=[0.3, 0.4, 0.2, 0.1]))
            seen.add(current)
            reviews.append({"reviewerID": user, "asin": asins[current], "unixReviewTime": time, "overall": 5.0,
                            "reviewText": "synthetic review"})

    meta = []
    category_names = [" ".join(words).title() for words in nouns]
    for k in range(n_items):
        words = nouns[int(shown_category[k])]
        adjective = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
        title = f"{brands[int(rng.integers(len(brands)))]} {adjective} {words[int(rng.integers(3))]} {words[int(rng.integers(3))]} {int(rng.integers(1, 100))}"
        if codes[k]:
            title += f" {codes[k]}"
        meta.append({
            "asin": asins[k],
            "title": title,
            "category": [cfg.name, category_names[int(category[k])]],
            "imageURLHighRes": [],
            "imageURL": [],
        })

    latents = {
        "config": to_dict(cfg),
        "asin": asins,
        "category": category.tolist(),
        "style": style.tolist(),
        "shown_category": shown_category.tolist(),
        "shown_style": shown_style.tolist(),
        "popularity": popularity.round(6).tolist(),
        "category_transition": transition_matrix(category_successor, cfg.stay).tolist(),
        "style_transition": transition_matrix(style_successor, cfg.stay).tolist(),
        "category_words": nouns,
        "partner": partner.tolist(),
        "style_names": [f"{list(_COLOURS)[style_index // 4]} {_SHAPES[style_index % 4]}" for style_index in range(n_styles)],
    }

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, marks=(LATENTS,)) as tmp:
        (tmp / f"{cfg.name}.json.gz").write_bytes(_gzip_lines(reviews))
        (tmp / f"meta_{cfg.name}.json.gz").write_bytes(_gzip_lines(meta))
        (tmp / "images").mkdir()
        for k in range(n_items):
            buffer = io.BytesIO()
            _draw_image(rng, int(shown_style[k]), cfg.image_size).save(buffer, format="PNG")
            (tmp / "images" / f"{asins[k]}.png").write_bytes(buffer.getvalue())
        (tmp / "oracle").mkdir()  # a subfolder, so readers given the raw folder never see it
        (tmp / LATENTS).write_text(json.dumps(latents, sort_keys=True) + "\n")
    return out


def load_latents(path: str | Path) -> dict:
    """The known latents of a synthetic domain, from its raw folder or the JSON file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / LATENTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no synthetic latents here (written by `vlm2rec-lab data synth`)")
    return json.loads(path.read_text())


class OracleScorer:
    """Best ranking from one modality's *shown* latent, given the true transition chains (Markov on
    the last item). ``modality``: ``text`` (shown category), ``image`` (shown style), ``both``, or
    ``latent`` (the true latents: the ceiling). The shortcut's partner, shown by the title's code,
    ranks first for ``text``, ``both`` and ``latent``. ``both`` scores the chains as if both shown
    latents were true (their product; the joint chain where ``shared`` > 0 moves them together), so
    with a shared latent and a noisy image it can fall below ``text`` alone. Ties are broken at random
    (seeded), so a modality that carries no signal ranks exactly at chance in expectation."""

    MODALITIES = ("text", "image", "both", "latent")

    def __init__(self, latents: dict | str | Path, item_ids, modality: str, seed: int = 0):
        if modality not in self.MODALITIES:
            raise ValueError(f"modality must be one of {self.MODALITIES}, got {modality!r}")
        if not isinstance(latents, dict):
            latents = load_latents(latents)
        row_of_asin = {asin: k for k, asin in enumerate(latents["asin"])}
        try:
            rows = np.array([row_of_asin[str(i)] for i in item_ids])
        except KeyError as e:
            raise KeyError(f"item {e.args[0]} is not in the synthetic latents (another seed's data?)") from None
        category_transition = np.asarray(latents["category_transition"])
        style_transition = np.asarray(latents["style_transition"])
        shown = modality != "latent"
        category = np.asarray(latents["shown_category" if shown else "category"])[rows]
        style = np.asarray(latents["shown_style" if shown else "style"])[rows]
        self.category, self.style, self.modality = category, style, modality  # (n_items,) shown (or true) latents
        self.category_transition, self.style_transition = category_transition, style_transition
        # shared > 0: the latents move together (synthetic.generate), so both/latent score the joint chain
        self.coupled = latents.get("config", {}).get("shared", 0.0) > 0
        self.category_successor, self.style_successor = (np.argmax(transition - np.diag(np.diag(transition)), axis=1)
                                                         for transition in (category_transition, style_transition))
        # the series shortcut: the last item's partner first (text shows the code; the image cannot)
        item_of_row = {int(row): item for item, row in enumerate(rows)}
        partner_rows = np.asarray(latents.get("partner", [-1] * len(latents["asin"])))[rows]
        self.partner = np.array([item_of_row.get(int(row), -1) for row in partner_rows]) if modality != "image" else None
        self.jitter = np.random.default_rng(seed).random(len(rows)) * 1e-9
        self.name = f"oracle-{modality}"

    def __call__(self, histories: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        last = histories[:, -1]
        if candidates is None:  # every item for every user
            candidates = np.arange(self.category.size)[None, :].repeat(len(last), 0)
        last_category, last_style = self.category[last][:, None], self.style[last][:, None]  # (B, 1)
        candidate_category, candidate_style = self.category[candidates], self.style[candidates]  # (B, C)
        if self.coupled and self.modality in ("both", "latent"):
            # one stay-or-move decision for both latents: the joint chain, not the product of its marginals
            stay = np.diag(self.category_transition)[last_category]
            stays = (candidate_category == last_category) & (candidate_style == last_style)
            moves = ((candidate_category == self.category_successor[last_category])
                     & (candidate_style == self.style_successor[last_style]))
            score = stay * stays + (1 - stay) * moves
        else:
            score = np.ones(candidates.shape)
            if self.modality in ("text", "both", "latent"):
                score = score * self.category_transition[last_category, candidate_category]
            if self.modality in ("image", "both", "latent"):
                score = score * self.style_transition[last_style, candidate_style]
        if self.partner is not None:
            score = score + 10.0 * (candidates == self.partner[last][:, None])
        return score + self.jitter[candidates]


def synthetic_dataset(out: str | Path, cfg: SynthConfig | None = None, overwrite: bool = False, progress: bool = False):
    """The synthetic domain generated into ``out/raw`` and prepared into ``out/data`` (the same
    readers and preparation as real data): the loaded :class:`~vlm2rec_lab.data.dataset.Dataset`."""
    from ..config import PrepareConfig
    from .dataset import prepare

    out = Path(out)
    raw = generate(cfg or SynthConfig(), out / "raw", overwrite=overwrite)
    prepare_config = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))],
                                   images=str(raw / "images"))
    return prepare(prepare_config, out / "data", overwrite=overwrite, progress=progress)
