"""The synthetic planted-modality domain: the embedded default dataset (DESIGN §1).

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
only, see the README): ρ = 1, ``stay`` 0.8, ``text_signal`` 1, ``image_signal`` 0.7. The title
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
        w = _word(rng, int(rng.integers(2, 4)))
        if w not in used:
            used.add(w)
            words.append(w)
    nouns = [words[3 * c:3 * c + 3] for c in range(cfg.categories)]
    brands = [w.capitalize() for w in words[3 * cfg.categories:]]
    return nouns, brands


def _successor(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random cyclic permutation: every state moves to a different one."""
    order = rng.permutation(n)
    succ = np.empty(n, dtype=np.int64)
    succ[order] = np.roll(order, -1)
    return succ


def transition_matrix(succ: np.ndarray, stay: float) -> np.ndarray:
    """T[a, b] = P(next latent = b | latent = a) = stay·1[a=b] + (1 − stay)·1[b = succ(a)]."""
    n = succ.size
    T = stay * np.eye(n)
    T[np.arange(n), succ] += 1.0 - stay
    return T


def _series_codes(rng: np.random.Generator, n: int, partner: np.ndarray, taken: set[str]) -> list[str]:
    """One made-up series code per pair of partners (shared by both titles), "" for items without one."""
    codes = [""] * n
    if (partner > np.arange(n)).sum() > 100_000:
        raise ValueError(f"items: {n} is too many for series codes (at most 200,000 items with shortcut > 0)")
    used = set(taken) | set(_ADJECTIVES)
    for k in range(n):
        if partner[k] > k:
            while (w := _word(rng, 3)) in used:
                pass
            used.add(w)
            codes[k] = codes[partner[k]] = w.upper()
    return codes


def _draw_image(rng: np.random.Generator, style: int, size: int) -> Image.Image:
    shape = _SHAPES[style % 4]
    colour = list(_COLOURS.values())[style // 4]
    bg = tuple(int(x) for x in rng.integers(200, 256, size=3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for _ in range(6):  # grey distractor dots
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        g = int(rng.integers(120, 200))
        d.ellipse([x, y, x + 3, y + 3], fill=(g, g, g))
    r = int(size * rng.uniform(0.22, 0.32))
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return im


def _gzip_lines(records: list[dict]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        for r in records:
            gz.write(json.dumps(r, sort_keys=True).encode() + b"\n")
    return buf.getvalue()


def generate(cfg: SynthConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Write the synthetic domain as Amazon 2018 raw files + PNG images + ``oracle/latents.json``."""
    rng = np.random.default_rng(cfg.seed)
    nouns, brands = _vocabulary(cfg)
    n, C, S = cfg.items, cfg.categories, cfg.styles

    # latents, balanced; what each modality shows
    cat = rng.permutation(np.arange(n) % C)
    style = rng.permutation(np.arange(n) % S)
    aux = np.random.default_rng([cfg.seed, 1])  # the shared latent's and the shortcut's draws (none at 0)
    if cfg.shared > 0:  # tied items show their category as their style too (categories == styles)
        style = np.where(aux.random(n) < cfg.shared, cat, style)
    shows_cat = rng.random(n) < cfg.text_signal
    shows_style = rng.random(n) < cfg.image_signal
    shown_cat = np.where(shows_cat, cat, rng.integers(0, C, size=n))
    shown_style = np.where(shows_style, style, rng.integers(0, S, size=n))
    popularity = rng.lognormal(0.0, 1.0, size=n)
    succ_c, succ_s = _successor(rng, C), _successor(rng, S)
    if cfg.shared > 0:  # one chain: the style moves as the category does
        succ_s = succ_c.copy()
    partner = np.full(n, -1)
    if cfg.shortcut > 0:  # series pairs: two items that share a series code in their titles
        order = aux.permutation(n)
        partner[order[0:n - 1:2]], partner[order[1:n:2]] = order[1:n:2], order[0:n - 1:2]
    codes = _series_codes(aux, n, partner, {w.lower() for w in brands} | {w for ws in nouns for w in ws})
    asins = [f"S{cfg.seed:02d}{k:06d}" for k in range(n)]

    cells: dict[tuple[int, int], np.ndarray] = {}
    for k in range(n):
        cells.setdefault((int(cat[k]), int(style[k])), []).append(k)
    cells = {key: np.array(v) for key, v in cells.items()}

    # sequences
    reviews = []
    t_start = 1514764800  # 2018-01-01
    for u in range(cfg.users):
        length = cfg.min_len + int(rng.geometric(1.0 / max(1.0, cfg.mean_len - cfg.min_len + 1))) - 1
        length = min(length, n // 2)
        seen: set[int] = set()
        cur = int(rng.choice(n, p=popularity / popularity.sum()))
        t = t_start + int(rng.integers(0, 365)) * 86400
        user = f"U{cfg.seed:02d}{u:06d}"
        for pos in range(length):
            if pos:
                nxt = None
                if cfg.shortcut > 0 and partner[cur] >= 0 and partner[cur] not in seen and aux.random() < cfg.shortcut:
                    nxt = int(partner[cur])
                elif rng.random() >= cfg.noise:
                    if cfg.shared > 0:  # one stay-or-move decision for both latents
                        keep = rng.random() < cfg.stay
                        c = int(cat[cur]) if keep else int(succ_c[cat[cur]])
                        s = int(style[cur]) if keep else int(succ_s[style[cur]])
                    else:
                        c = int(cat[cur]) if rng.random() < cfg.stay else int(succ_c[cat[cur]])
                        s = int(style[cur]) if rng.random() < cfg.stay else int(succ_s[style[cur]])
                    pool = [k for k in cells.get((c, s), ()) if k not in seen]
                    if pool:
                        w = popularity[pool]
                        nxt = int(rng.choice(pool, p=w / w.sum()))
                if nxt is None:
                    pool = np.setdiff1d(np.arange(n), list(seen))
                    nxt = int(rng.choice(pool))
                cur = nxt
                t += int(rng.choice([0, 86400, 2 * 86400, 7 * 86400], p=[0.3, 0.4, 0.2, 0.1]))
            seen.add(cur)
            reviews.append({"reviewerID": user, "asin": asins[cur], "unixReviewTime": t, "overall": 5.0,
                            "reviewText": "synthetic review"})

    meta = []
    cat_names = [" ".join(w).title() for w in nouns]
    for k in range(n):
        words = nouns[int(shown_cat[k])]
        adj = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
        title = f"{brands[int(rng.integers(len(brands)))]} {adj} {words[int(rng.integers(3))]} {words[int(rng.integers(3))]} {int(rng.integers(1, 100))}"
        if codes[k]:
            title += f" {codes[k]}"
        meta.append({
            "asin": asins[k],
            "title": title,
            "category": [cfg.name, cat_names[int(cat[k])]],
            "imageURLHighRes": [],
            "imageURL": [],
        })

    latents = {
        "config": to_dict(cfg),
        "asin": asins,
        "category": cat.tolist(),
        "style": style.tolist(),
        "shown_category": shown_cat.tolist(),
        "shown_style": shown_style.tolist(),
        "popularity": popularity.round(6).tolist(),
        "category_transition": transition_matrix(succ_c, cfg.stay).tolist(),
        "style_transition": transition_matrix(succ_s, cfg.stay).tolist(),
        "category_words": nouns,
        "partner": partner.tolist(),
        "style_names": [f"{list(_COLOURS)[s // 4]} {_SHAPES[s % 4]}" for s in range(S)],
    }

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, marks=(LATENTS,)) as tmp:
        (tmp / f"{cfg.name}.json.gz").write_bytes(_gzip_lines(reviews))
        (tmp / f"meta_{cfg.name}.json.gz").write_bytes(_gzip_lines(meta))
        (tmp / "images").mkdir()
        for k in range(n):
            buf = io.BytesIO()
            _draw_image(rng, int(shown_style[k]), cfg.image_size).save(buf, format="PNG")
            (tmp / "images" / f"{asins[k]}.png").write_bytes(buf.getvalue())
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
    with a shared latent and a noisy image it can fall below ``text`` alone. Ties are broken at random (seeded), so a modality that carries no signal ranks
    exactly at chance in expectation."""

    MODALITIES = ("text", "image", "both", "latent")

    def __init__(self, latents: dict | str | Path, item_ids, modality: str, seed: int = 0):
        if modality not in self.MODALITIES:
            raise ValueError(f"modality must be one of {self.MODALITIES}, got {modality!r}")
        if not isinstance(latents, dict):
            latents = load_latents(latents)
        row = {a: k for k, a in enumerate(latents["asin"])}
        try:
            idx = np.array([row[str(i)] for i in item_ids])
        except KeyError as e:
            raise KeyError(f"item {e.args[0]} is not in the synthetic latents (another seed's data?)") from None
        Tc = np.asarray(latents["category_transition"])
        Ts = np.asarray(latents["style_transition"])
        shown = modality != "latent"
        c = np.asarray(latents["shown_category" if shown else "category"])[idx]
        s = np.asarray(latents["shown_style" if shown else "style"])[idx]
        self.c, self.s, self.Tc, self.Ts, self.modality = c, s, Tc, Ts, modality
        # shared > 0: the latents move together (synthetic.generate), so both/latent score the joint chain
        self.coupled = latents.get("config", {}).get("shared", 0.0) > 0
        self.succ_c, self.succ_s = (np.argmax(T - np.diag(np.diag(T)), axis=1) for T in (Tc, Ts))
        # the series shortcut: the last item's partner first (text shows the code; the image cannot)
        pos = {int(k): j for j, k in enumerate(idx)}
        partner = np.asarray(latents.get("partner", [-1] * len(latents["asin"])))[idx]
        self.partner = np.array([pos.get(int(p), -1) for p in partner]) if modality != "image" else None
        self.jitter = np.random.default_rng(seed).random(len(idx)) * 1e-9
        self.name = f"oracle-{modality}"

    def __call__(self, histories: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        last = histories[:, -1]
        cand = np.arange(self.c.size)[None, :].repeat(len(last), 0) if candidates is None else candidates
        c0, s0, c1, s1 = self.c[last][:, None], self.s[last][:, None], self.c[cand], self.s[cand]
        if self.coupled and self.modality in ("both", "latent"):
            # one stay-or-move decision for both latents: the joint chain, not the product of its marginals
            stay = np.diag(self.Tc)[c0]
            score = stay * ((c1 == c0) & (s1 == s0)) + (1 - stay) * ((c1 == self.succ_c[c0]) & (s1 == self.succ_s[s0]))
        else:
            score = np.ones(cand.shape)
            if self.modality in ("text", "both", "latent"):
                score = score * self.Tc[c0, c1]
            if self.modality in ("image", "both", "latent"):
                score = score * self.Ts[s0, s1]
        if self.partner is not None:
            score = score + 10.0 * (cand == self.partner[last][:, None])
        return score + self.jitter[cand]


def synthetic_dataset(out: str | Path, cfg: SynthConfig | None = None, overwrite: bool = False, progress: bool = False):
    """The synthetic domain generated into ``out/raw`` and prepared into ``out/data`` (the same
    readers and preparation as real data): the loaded :class:`~vlm2rec_lab.data.dataset.Dataset`."""
    from ..config import PrepareConfig
    from .dataset import prepare

    out = Path(out)
    raw = generate(cfg or SynthConfig(), out / "raw", overwrite=overwrite)
    prep = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))],
                         images=str(raw / "images"))
    return prepare(prep, out / "data", overwrite=overwrite, progress=progress)
