"""Contact sheets of the caption evaluation: held-out images with their reference and generated captions.

Each caption evaluation at step S writes (rank 0 only), under ``OUTPUT_DIR/eval/``:

  step_{S:07d}.html  self-contained page: a table of thumbnails (base64 PNG), reference and generated caption
                     (words that differ from the other caption highlighted), per-image exact match and token
                     accuracy, and the step's totals
  step_{S:07d}.png   the same as one image: a grid of thumbnails with the wrapped captions beneath
  index.html         links to every step's page and sheet, newest first

and adds the PNG to TensorBoard as ``eval/contact_sheet`` when TensorBoard is on. The sheet shows the captioning
evaluator's records, at most :data:`SHEET_IMAGES`: a random sample of the whole held-out set drawn with a fixed
seed (``evaluation/captioning.py``, option ``seed``, default ``train.seed``), the same images at every evaluation
and after a resume, in index order (fewer when fewer images are captioned). The thumbnails are the pixels the model
saw: the stored patches put back together at the training resolution.
Every file is written to a temporary name and renamed, so a run killed mid-write leaves no torn file.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_genlip.data.image_processing import patches_to_rgb
from megatron_genlip.data.files import replace_atomically

SHEET_IMAGES = 16  # held-out images on a sheet: the first records of the captioning evaluator's seeded sample
COLUMNS = 4  # cells per row of the PNG
CELL_WIDTH = 256
THUMB = 160  # thumbnails fit in THUMB x THUMB (small images are enlarged by a whole factor, nearest neighbour)
MAX_LINES = 5  # wrapped lines per caption in the PNG (the HTML shows all of it)
PAD = 8
FONT_SIZE = 12
STEP_FILE = re.compile(r"^step_(\d{7,})\.html$")

GOOD, BAD, TEXT, MUTED = (0, 110, 40), (180, 20, 20), (20, 20, 20), (110, 110, 110)


def held_out_pixels(dataset, records: list[dict]) -> list[np.ndarray]:
    """[H, W, 3] uint8 images of the records' held-out samples, as the model saw them."""
    out = []
    for r in records:
        sample = dataset[r["index"]]
        out.append(patches_to_rgb(sample.patches, sample.grid))
    return out


def thumbnail(rgb: np.ndarray) -> Image.Image:
    """The image fitted into THUMB x THUMB: enlarged by a whole factor (nearest) or shrunk (bilinear)."""
    img = Image.fromarray(rgb, "RGB")
    side = max(img.size)
    if side <= THUMB:
        k = THUMB // side
        return img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img
    scale = THUMB / side
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)


# ---------------------------------------------------------------------------------------------
# the PNG

def _font():
    """PIL's own font (no font files needed): the built-in scalable one at FONT_SIZE where PIL has FreeType,
    else the bitmap fallback."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (ImportError, OSError, TypeError):  # no FreeType, or a PIL older than 10.1
        return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """PIL's bitmap fallback font only draws Latin-1; other characters become '?'."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def wrap(text: str, font, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` pixels (over-long words broken), at most
    ``max_lines`` (the last one ending in '...' when text was cut)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    lines: list[str] = []
    current = ""
    for word in _drawable(text, font).split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and not fits(word):  # a word wider than the line: break it
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines or [""]


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Agjy|")
    return bottom + 3


def sheet_size(num_images: int, font=None) -> tuple[int, int]:
    """(width, height) of the PNG for ``num_images`` cells."""
    line = _line_height(font or _font())
    cols = max(1, min(COLUMNS, num_images))
    rows = max(1, -(-num_images // COLUMNS))
    cell_height = PAD + line + THUMB + PAD + 2 * (MAX_LINES + 1) * line + PAD
    return cols * CELL_WIDTH, 2 * PAD + line + rows * cell_height


def render_png(step: int, records: list[dict], images: list[np.ndarray], totals: dict) -> np.ndarray:
    """The contact sheet as an [H, W, 3] uint8 array: a title line, then per image its number, exact match and
    token accuracy, the thumbnail, the reference caption and the generated one (green if exact, red if not)."""
    font = _font()
    line = _line_height(font)
    width, height = sheet_size(len(records), font)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), _drawable(title(step, totals, len(records)), font), fill=TEXT, font=font)
    cell_height = (height - 2 * PAD - line) // max(1, -(-len(records) // COLUMNS))
    text_width = CELL_WIDTH - 2 * PAD
    for k, (rec, rgb) in enumerate(zip(records, images)):
        x0 = (k % COLUMNS) * CELL_WIDTH
        y = 2 * PAD + line + (k // COLUMNS) * cell_height
        draw.rectangle((x0 + 2, y, x0 + CELL_WIDTH - 3, y + cell_height - 4), outline=(210, 210, 210))
        colour = GOOD if rec["exact"] else BAD
        draw.text((x0 + PAD, y + PAD), f"#{rec['index']}  {'exact' if rec['exact'] else 'differs'}  "
                  f"token acc {100 * rec['token_accuracy']:.0f}%", fill=colour, font=font)
        y += PAD + line
        thumb = thumbnail(rgb)
        sheet.paste(thumb, (x0 + (CELL_WIDTH - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        y += THUMB + PAD
        for label, text, fill in (("reference", rec["reference"], TEXT), ("generated", rec["generated"], colour)):
            draw.text((x0 + PAD, y), label, fill=MUTED, font=font)
            y += line
            pieces = wrap(text, font, text_width)
            for piece in pieces:
                draw.text((x0 + PAD, y), piece, fill=fill, font=font)
                y += line
            y += line * (MAX_LINES - len(pieces))
    return np.asarray(sheet)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the HTML

def title(step: int, totals: dict, shown: int) -> str:
    parts = [f"step {step}"]
    if "caption_exact_match" in totals:
        parts.append(f"exact match {100 * totals['caption_exact_match']:.1f}%")
    if "caption_token_accuracy" in totals:
        parts.append(f"token accuracy {100 * totals['caption_token_accuracy']:.1f}%")
    if "caption_images" in totals:
        parts.append(f"{totals['caption_images']} images captioned, first {shown} shown")
    if "val_loss" in totals:
        parts.append(f"val loss {totals['val_loss']:.4f}")
    return " | ".join(parts)


def marked_words(text: str, other: str, css: str) -> str:
    """``text`` escaped, its words that are not matched in ``other`` wrapped in <span class=css>."""
    words, others = text.split(), other.split()
    out = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(a=words, b=others, autojunk=False).get_opcodes():
        chunk = html.escape(" ".join(words[i1:i2]))
        if chunk:
            out.append(chunk if op == "equal" else f'<span class="{css}">{chunk}</span>')
    return " ".join(out)


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}
td.caption{max-width:32em;overflow-wrap:anywhere}
tr.differs td.num{background:#fbe3e3}tr.exact td.num{background:#e1f5e5}
img{image-rendering:pixelated}.missing{text-decoration:underline wavy #b41414}
.wrong{background:#fbd0d0}.meta{color:#666}"""


def render_html(step: int, records: list[dict], images: list[np.ndarray], totals: dict) -> str:
    rows = []
    for rec, rgb in zip(records, images):
        thumb = thumbnail(rgb)
        data = base64.b64encode(png_bytes(np.asarray(thumb))).decode("ascii")
        rows.append(
            f'<tr class="{"exact" if rec["exact"] else "differs"}"><td class="num">{int(rec["index"])}</td>'
            f'<td><img src="data:image/png;base64,{data}" width="{thumb.width}" height="{thumb.height}" '
            f'alt="held-out image {int(rec["index"])}"></td>'
            f'<td class="caption">{marked_words(rec["reference"], rec["generated"], "missing")}</td>'
            f'<td class="caption">{marked_words(rec["generated"], rec["reference"], "wrong")}</td>'
            f'<td>{"yes" if rec["exact"] else "no"}</td><td>{100 * rec["token_accuracy"]:.1f}%</td></tr>')
    name = f"step_{step:07d}"
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>held-out captions, step {step}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>Held-out captions at step {step}</h1>\n"
            f'<p>{html.escape(title(step, totals, len(records)))}</p>\n'
            '<p class="meta">Reference words missing from the generated caption are underlined, generated words '
            'not in the reference are shaded. '
            f'<a href="{name}.png">contact sheet (PNG)</a> | <a href="index.html">all steps</a></p>\n'
            "<table><tr><th>#</th><th>image</th><th>reference</th><th>generated</th><th>exact</th>"
            "<th>token accuracy</th></tr>\n" + "\n".join(rows) + "\n</table></body></html>\n")


def render_index(directory: Path) -> str:
    steps = sorted((int(m.group(1)) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))), reverse=True)
    items = "\n".join(f'<li><a href="step_{s:07d}.html">step {s}</a> (<a href="step_{s:07d}.png">PNG</a>)</li>'
                      for s in steps)
    return ('<!doctype html>\n<html><head><meta charset="utf-8"><title>held-out captions</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>Held-out captions, newest first</h1>\n<ul>\n{items}\n</ul>"
            "</body></html>\n")


# ---------------------------------------------------------------------------------------------
# writing

def write_contact_sheet(directory: str | Path, step: int, records: list[dict], images: list[np.ndarray],
                        totals: dict, tensorboard=None) -> tuple[Path, Path]:
    """Write step ``step``'s PNG and HTML and the index under ``directory`` (and the PNG to ``tensorboard``, a
    SummaryWriter, if given). ``records``: {"index", "reference", "generated", "exact", "token_accuracy"} per
    image, ``images`` their [H, W, 3] uint8 pixels. Returns the PNG and HTML paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records, images = records[:SHEET_IMAGES], images[:SHEET_IMAGES]
    sheet = render_png(step, records, images, totals)
    png = directory / f"step_{step:07d}.png"
    page = directory / f"step_{step:07d}.html"
    replace_atomically(png, png_bytes(sheet))
    replace_atomically(page, render_html(step, records, images, totals).encode("utf-8"))
    replace_atomically(directory / "index.html", render_index(directory).encode("utf-8"))
    if tensorboard is not None:
        tensorboard.add_image("eval/contact_sheet", sheet, step, dataformats="HWC")
    return png, page


def write_eval_sheet(directory: str | Path, step: int, results: dict, records: list[dict], dataset, log) -> None:
    """The trainer's call after a caption evaluation (``results``: its metrics, ``records``: the per-image
    captions of ``evaluate.caption_metrics``, ``dataset``: the held-out samples they index): writes the sheet on
    the rank whose ``log`` (a RunLogger) is enabled, i.e. rank 0. A failed write (disk full, permissions) is
    reported and does not stop training."""
    if not log.enabled or not records:
        return
    try:
        png, page = write_contact_sheet(directory, step, records, held_out_pixels(dataset, records), results, log.tb)
    except OSError as e:
        log.print(f"warning: could not write the caption contact sheet for step {step}: {e}")
        return
    log.print(f"caption contact sheet: {page} ({png.name})")
