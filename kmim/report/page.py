"""HTML building blocks of the report: one self-contained page (inline CSS, no script, nothing fetched from
elsewhere) linking PNGs beside it by relative paths. Every text from a dataset goes through :func:`esc`."""

from __future__ import annotations

import html
from collections.abc import Iterable

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table.kv td { padding: .15em .8em .15em 0; vertical-align: top; } table.kv td:first-child { color: #666; }
code, .mono { font-family: ui-monospace, monospace; font-size: .92em; word-break: break-all; }
.note { color: #555; max-width: 60em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
img.plot { max-width: 100%; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: .6em 1.2em; }
.code { border: 1px solid #ddd; border-radius: 4px; padding: .3em .5em; }
.code.dead { background: #fbeaea; border-color: #e0a0a0; }
.code .head { font-size: .85em; margin-bottom: .25em; }
.badge { background: #c0392b; color: #fff; border-radius: 3px; padding: 0 .35em; font-size: .8em; }
.strip, .map { position: relative; display: inline-block; line-height: 0; }
.strip img, .map img, .view img { image-rendering: pixelated; }
.strip span, .map span { position: absolute; }
.strip span { box-shadow: inset 0 0 0 1px rgba(255,255,255,.6); }
.strip span:hover, .map span:hover { box-shadow: inset 0 0 0 2px #000; }
.sample { margin: 1em 0; border-top: 1px solid #eee; padding-top: .6em; }
.views { display: flex; flex-wrap: wrap; gap: 1em 2em; margin-top: .4em; }
.view { display: flex; gap: .4em; align-items: flex-start; }
.legend { display: flex; flex-wrap: wrap; gap: .15em .6em; max-width: 32em; font-size: .8em; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: middle; margin-right: .2em;
          border: 1px solid #0004; }
"""


def esc(value: object) -> str:
    """``value`` as HTML text, safe inside an element and a quoted attribute."""
    return html.escape(str(value), quote=True)


def page(title: str, sections: Iterable[str]) -> str:
    """The whole document: ``title`` (escaped here) and already built ``sections``."""
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{CSS}</style>\n</head>\n'
            f"<body>\n<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n")


def section(title: str, *parts: str) -> str:
    """A titled section of already built ``parts``."""
    return f"<section>\n<h2>{esc(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(rows: Iterable[tuple[str, object]]) -> str:
    """A two-column table of (name, value); a None value shows as "-", a float with 4 decimals."""
    cells = "".join(f"<tr><td>{esc(name)}</td><td class=\"mono\">{esc(_shown(value))}</td></tr>\n"
                    for name, value in rows)
    return f'<table class="kv">\n{cells}</table>'


def _shown(value: object) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def figure(src: str, alt: str, caption: str) -> str:
    """A plot PNG at ``src`` (relative), with its caption."""
    return (f'<figure><img class="plot" src="{esc(src)}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def overlaid(kind: str, src: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int, str]],
             alt: str) -> str:
    """An image ``src`` shown at ``size`` (width, height) CSS px with hover boxes (left, top, width, height,
    title) over it; ``kind`` "strip" or "map" styles it."""
    spans = "".join(f'<span style="left:{x}px;top:{y}px;width:{w}px;height:{h}px" title="{esc(t)}"></span>'
                    for x, y, w, h, t in boxes)
    return (f'<div class="{kind}"><img src="{esc(src)}" width="{size[0]}" height="{size[1]}" alt="{esc(alt)}">'
            f"{spans}</div>")
