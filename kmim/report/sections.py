"""The report's sections: each returns its HTML and writes the PNGs it links under ``out / ASSETS``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kmim.files import atomic_write_bytes
from kmim.report.dataset import Dataset, Scanned
from kmim.report.gallery import Nearest, png_bytes, write_strip
from kmim.report.page import esc, figure, note, overlaid, section, table
from kmim.report.plots import HEATMAP_ROWS, class_heatmap, inertia_plot, usage_plot
from kmim.report.tokenmaps import enlarged, hex_colour, legend, overlay, palette

ASSETS = "assets"  # the folder beside index.html holding every PNG
PATCH_PX = 48  # about how wide a gallery patch is shown (CSS px), enlarged by a whole factor
MAP_PX = 192  # about how wide a token map is drawn at least (px), enlarged by a whole factor


def class_names(manifest: dict, labels: list[int]) -> list[str]:
    """The names of label ids ``labels``: the manifest's ``labels`` entry, else the id itself."""
    names = manifest.get("labels")
    named = isinstance(names, list)
    return [str(names[i]) if named and 0 <= i < len(names) else str(i) for i in labels]


def overview(data: Dataset, scanned: int) -> str:
    """What the dataset is: tokenizer, extractor, grid, sizes, counts."""
    m, meta = data.manifest, data.book.metadata
    extractor = meta.get("extractor", "?") + (f" {meta['model']}" if meta.get("model") else "")
    skipped = m.get("skipped")
    skipped = ", ".join(f"{k} {v}" for k, v in skipped.items()) if isinstance(skipped, dict) else skipped
    return section("Dataset", table([
        ("dataset", data.where), ("tokenizer_id", m["tokenizer_id"]), ("extractor", extractor),
        ("codes (K)", data.book.k), ("token grid", " x ".join(map(str, m["token_grid"]["shape"]))),
        ("view size", f"{data.preprocess.image_size} px, patches of {m['token_grid']['patch_size']} px"),
        ("extractor view size", f"{data.extract_size} px"), ("samples", m["samples"]), ("inputs", m.get("inputs")),
        ("skipped inputs", skipped or "none"), ("shards", len(m["shards"])),
        ("samples scanned for this report", scanned), ("kmim version", m.get("kmim_version"))]))


def numbers(data: Dataset, report: dict, out: Path) -> str:
    """The tokenizer report's numbers and the usage, token-by-class and k-means plots."""
    rows = [("utilization (codes used / K)", report["utilization"]), ("used codes", report["used_codes"]),
            ("perplexity (exp entropy of code usage)", report["perplexity"]),
            ("TCAS (lower: codes align with classes)", report["tcas"]), ("patches", report["patches"]),
            ("classes", report["classes"])]
    usage_plot(data.usage, out / ASSETS / "usage.png")
    parts = [table(rows), figure(f"{ASSETS}/usage.png", "code usage", "Patches per code over the whole dataset "
                                 "(from the shard indexes).")]
    labels = sorted(data.counts.by_label)
    if report["tcas"] is not None:
        counts = np.stack([data.counts.by_label[lab] for lab in labels], axis=1)
        class_heatmap(counts, class_names(data.manifest, labels), out / ASSETS / "classes.png")
        shown = min(HEATMAP_ROWS, int((data.usage > 0).sum()))
        parts.append(figure(f"{ASSETS}/classes.png", "token-by-class matrix",
                            f"Token-by-class matrix: each row is one of the {shown} most used codes, its patches' "
                            "class distribution. TCAS is low when rows are one-hot."))
    else:
        parts.append(note("No token-by-class matrix or TCAS: the dataset has no labels (or some samples lack one)."))
    if data.fit is not None:
        inertia_plot(data.fit["history"], out / ASSETS / "inertia.png")
        parts.append(figure(f"{ASSETS}/inertia.png", "k-means inertia curve", data.fit_note))
    else:
        parts.append(note(f"{data.fit_note} Final inertia per point from the codebook: "
                          f"{data.book.metadata.get('inertia_per_point', 'not recorded')}."))
    return section("Tokenizer", *parts)


def gallery(data: Dataset, nearest: Nearest, keys: list[str], rule: str, ranked: bool, max_codes: int | None,
            out: Path) -> str:
    """Every code (or the ``max_codes`` most used), by usage: its patches from ``nearest`` (scores are distances
    when ``ranked``), usage, dead marker; ``keys`` the scanned samples' keys."""
    hist = data.usage
    total = max(int(hist.sum()), 1)
    order = np.argsort(-hist, kind="stable")[:max_codes]
    (out / ASSETS / "gallery").mkdir(exist_ok=True)
    patch = nearest.patches.shape[1]
    zoom = max(1, math.ceil(PATCH_PX / patch))
    cards = [_card(int(code), int(hist[code]), total, nearest, keys, ranked, (patch, zoom), out) for code in order]
    shown = "all" if len(order) == data.book.k else f"the {len(order)} most used of"
    return section("Codebook gallery", note(f"{shown} {data.book.k} codes, most used first. {rule} Hover a patch "
                                            "for its sample key, view and position."),
                   '<div class="gallery">\n' + "\n".join(cards) + "\n</div>")


def _card(code: int, usage: int, total: int, nearest: Nearest, keys: list[str], ranked: bool,
          size: tuple[int, int], out: Path) -> str:
    """One code's card: id, usage (of ``total`` patches), and its patches as one strip PNG with a hover box per
    patch; ``size`` is (patch px, display zoom)."""
    dead = usage == 0
    head = (f'<div class="head"><b>code {code}</b> · {usage} patches ({100 * usage / total:.2f}%)'
            + (' <span class="badge">dead</span>' if dead else "") + "</div>")
    kept = nearest.of(code)
    refs, scores = nearest.ref[kept], nearest.score[kept]
    if not len(refs):
        body = note("dead: no patch carries this code" if dead else "no patch in the scanned samples")
        return f'<div class="code{" dead" if dead else ""}" id="code-{code}">{head}{body}</div>'
    src = f"{ASSETS}/gallery/code-{code:05d}.png"
    write_strip(out / src, nearest.patches[kept])
    side = size[0] * size[1]
    boxes = [(i * side, 0, side, side, f"{keys[r[0]]} · view {r[1]} · row {r[2]}, column {r[3]}"
              + (f" · distance {s:.4g}" if ranked else "")) for i, (r, s) in enumerate(zip(refs, scores, strict=True))]
    strip = overlaid("strip", src, (side * len(refs), side), boxes, f"patches of code {code}")
    return f'<div class="code" id="code-{code}">{head}{strip}</div>'


def token_maps(data: Dataset, shown: list[Scanned], out: Path) -> str:
    """The sampled images' views, each beside its token grid drawn over it, with a legend of its codes."""
    if not shown:
        return section("Token maps", note("No sample to show."))
    colours = palette(data.book.k)
    (out / ASSETS / "maps").mkdir(exist_ok=True)
    labels = [s.label for s in shown]
    names = dict(zip(labels, class_names(data.manifest, labels), strict=True))
    blocks = []
    for i, item in enumerate(shown):
        label = f" · class {names[item.label]}" if item.label >= 0 else ""
        views = [_map(i, v, item, colours, out) for v in range(len(item.tokens))]
        blocks.append(f'<div class="sample"><div><b class="mono">{esc(item.key)}</b>{esc(label)}</div>'
                      f'<div class="views">{"".join(views)}</div></div>')
    return section("Token maps", note(f"{len(shown)} samples spread over the scanned ones, every stored view "
                                      "(view 0 is the center view). Left: the view as the trainer sees it; right: "
                                      "its token grid, one colour per code. Hover a cell for its code."), *blocks)


def _map(i: int, v: int, item: Scanned, colours: np.ndarray, out: Path) -> str:
    """View ``v`` of shown sample ``i``: the view, its overlaid token grid with a hover box per cell, a legend."""
    pixels, tokens = item.pixels[v], item.tokens[v]
    zoom = max(1, math.ceil(MAP_PX / pixels.shape[0]))
    side, h = pixels.shape[0] * zoom, tokens.shape[0]
    view_src, map_src = f"{ASSETS}/maps/{i:03d}-view{v}.png", f"{ASSETS}/maps/{i:03d}-view{v}-tokens.png"
    atomic_write_bytes(out / view_src, png_bytes(enlarged(pixels, zoom)))
    atomic_write_bytes(out / map_src, png_bytes(overlay(pixels, tokens, colours, zoom)))
    cell = side // h
    boxes = [(c * cell, r * cell, cell, cell, f"row {r}, column {c}: code {tokens[r, c]}")
             for r in range(h) for c in range(tokens.shape[1])]
    swatches = "".join(f'<span><span class="swatch" style="background:{hex_colour(colours[t])}"></span>'
                       f'<a href="#code-{t}">{t}</a> ×{n}</span>' for t, n in legend(tokens))
    return (f'<div><div class="mono">view {v}</div><div class="view">'
            f'<img src="{view_src}" width="{side}" height="{side}" alt="view {v}">'
            f'{overlaid("map", map_src, (side, side), boxes, f"token grid of view {v}")}'
            f'<div class="legend">{swatches}</div></div></div>')
