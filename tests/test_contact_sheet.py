"""Caption contact sheets (training/contact_sheet.py): the pixels the model saw put back together, the PNG grid,
the self-contained HTML page, atomic writes, the trainer's rank-0 call and the TensorBoard image."""

from __future__ import annotations

import base64
import html
import io
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from megatron_genlip.data.image_processing import image_to_patches, patches_to_rgb, process_image, resized_rgb
from megatron_genlip.training import contact_sheet as cs

COLOURS = [(13, 200, 250), (250, 90, 7), (60, 3, 190), (201, 222, 17), (5, 140, 77)]


def record(i: int, reference: str, generated: str) -> dict:
    words_ref, words_gen = reference.split(), generated.split()
    acc = sum(a == b for a, b in zip(words_ref, words_gen)) / max(len(words_ref), len(words_gen), 1)
    return {"index": i, "reference": reference, "generated": generated, "exact": reference == generated,
            "token_accuracy": acc}


def solid(colour, h: int = 48, w: int = 48) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()


TOTALS = {"caption_exact_match": 0.5, "caption_token_accuracy": 0.75, "caption_images": 40, "val_loss": 0.25}


# ---------------------------------------------------------------------------------------------
# pixels back from patches

@pytest.mark.parametrize("settings", [dict(stage=1, image_size=64), dict(stage=2, min_pixels=4096, max_pixels=40000)])
def test_patches_back_to_the_resized_image(settings):
    """uint8 patches un-patchify to the resized image exactly; normalised float patches (the host reference path)
    come back within 1/255."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8), "RGB")
    want = resized_rgb(img, patch_size=16, **settings)
    patches, grid = image_to_patches(img, patch_size=16, **settings)
    assert np.array_equal(patches_to_rgb(torch.from_numpy(patches), grid), want)
    assert np.array_equal(patches_to_rgb(patches, grid), want)  # numpy works too
    floats, grid_f = process_image(img, patch_size=16, **settings)
    assert floats.dtype == torch.float32 and grid_f == grid
    back = patches_to_rgb(floats, grid_f)
    assert back.dtype == np.uint8 and back.shape == want.shape == (grid[0] * 16, grid[1] * 16, 3)
    assert np.abs(back.astype(int) - want.astype(int)).max() <= 1
    if settings["stage"] == 2:
        assert grid[0] != grid[1]  # a non-square grid: rows and columns are not swapped


def test_patches_that_do_not_fill_the_grid_are_an_error():
    patches, _ = image_to_patches(Image.new("RGB", (32, 32)), stage=1, image_size=32, patch_size=16)
    with pytest.raises(ValueError, match="do not match grid"):
        patches_to_rgb(patches, (3, 2))


# ---------------------------------------------------------------------------------------------
# the PNG

def test_png_grid_holds_every_thumbnail_in_its_own_cell():
    records = [record(i, "a red circle above a blue square", "a red circle above a blue square" if i % 2 == 0
                      else "a red circle") for i in range(5)]
    images = [solid(c) for c in COLOURS]
    sheet = cs.render_png(100, records, images, TOTALS)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    width, height = cs.sheet_size(5)
    assert sheet.shape[:2] == (height, width) and width == cs.COLUMNS * cs.CELL_WIDTH
    one_row = cs.sheet_size(cs.COLUMNS)[1]
    assert height > one_row and cs.sheet_size(1)[0] == cs.CELL_WIDTH  # 5 images: two rows; 1 image: one column
    for k, colour in enumerate(COLOURS):
        ys, xs = np.nonzero((sheet == np.array(colour, dtype=np.uint8)).all(-1))
        side = 48 * (cs.THUMB // 48)  # a 48x48 image enlarged 3x, nearest neighbour
        assert len(ys) == side * side, (k, len(ys))
        column, row = k % cs.COLUMNS, k // cs.COLUMNS
        assert column * cs.CELL_WIDTH <= xs.min() and xs.max() < (column + 1) * cs.CELL_WIDTH
        assert (row == 0) == (ys.max() < one_row)


def test_large_and_non_square_images_are_shrunk_to_fit():
    thumb = cs.thumbnail(solid((1, 2, 3), 480, 240))
    assert thumb.size == (cs.THUMB // 2, cs.THUMB)
    assert cs.thumbnail(solid((1, 2, 3), 16, 100)).size == (100, 16)  # fits already, no whole-factor enlargement


def test_wrap_keeps_lines_within_the_width_and_marks_cut_text():
    font = cs._font()
    lines = cs.wrap("word " * 200 + "x" * 300, font, 120)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert len(lines) == cs.MAX_LINES and lines[-1].endswith("...")
    assert all(draw.textlength(s, font=font) <= 120 for s in lines)
    assert cs.wrap("short caption", font, 200) == ["short caption"]
    broken = cs.wrap("y" * 100, font, 60, max_lines=50)
    assert "".join(broken) == "y" * 100 and len(broken) > 1


# ---------------------------------------------------------------------------------------------
# the HTML

def test_html_embeds_each_image_escapes_captions_and_marks_differences():
    nasty = 'a <script>alert("x")</script> & a \'blue\' square'
    records = [record(0, nasty, nasty), record(1, "a blue square on the left", "a green square on the left"),
               record(2, "two circles", "two circles")]
    images = [solid(COLOURS[0]), solid(COLOURS[1], 64, 32), solid(COLOURS[2], 300, 300)]
    page = cs.render_html(7, records, images, TOTALS)
    assert "<script>" not in page and html.escape("<script>alert(") in page
    assert html.escape("& a 'blue' square") in page
    srcs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)"', page)
    assert len(srcs) == page.count("<img") == 3
    for (data, w, h), rgb, colour in zip(srcs, images, COLOURS):
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.size == (int(w), int(h)) == cs.thumbnail(rgb).size
        assert np.asarray(thumb.convert("RGB"))[0, 0].tolist() == list(colour)
    assert '<span class="wrong">green</span>' in page and '<span class="missing">blue</span>' in page
    assert page.count('<tr class="differs">') == 1 and page.count('<tr class="exact">') == 2
    assert "exact match 50.0%" in page and 'href="step_0000007.png"' in page


# ---------------------------------------------------------------------------------------------
# writing

def test_files_per_step_an_index_and_no_temporaries(tmp_path):
    records = [record(i, "a blue square", "a blue square") for i in range(3)]
    images = [solid(c) for c in COLOURS[:3]]
    for step in (20, 100):
        png, page = cs.write_contact_sheet(tmp_path / "eval", step, records, images, TOTALS)
    names = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert names == ["index.html", "step_0000020.html", "step_0000020.png", "step_0000100.html", "step_0000100.png"]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), cs.render_png(100, records, images, TOTALS))
    assert page.read_text().count("<img") == 3
    index = (tmp_path / "eval" / "index.html").read_text()
    assert index.index("step_0000100.html") < index.index("step_0000020.html")  # newest first


def test_cap_on_images_shown(tmp_path):
    n = cs.SHEET_IMAGES + 3
    records = [record(i, "a", "a") for i in range(n)]
    _, page = cs.write_contact_sheet(tmp_path, 1, records, [solid((9, 9, 9), 16, 16)] * n, TOTALS)
    assert page.read_text().count("<img") == cs.SHEET_IMAGES


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "step_0000001.html"
    cs.replace_atomically(target, b"old page")

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        cs.replace_atomically(target, b"new page, never complete")
    assert target.read_bytes() == b"old page"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


class FakeLog:
    def __init__(self, enabled: bool, tb=None):
        self.enabled, self.tb, self.lines = enabled, tb, []

    def print(self, text: str) -> None:
        self.lines.append(text)


def fake_dataset(colours):
    """dataset[i] -> a sample with the uint8 patches of a solid image, as GenLIPIndexedDataset gives."""
    samples = []
    for c in colours:
        patches, grid = image_to_patches(Image.fromarray(solid(c)), stage=1, image_size=48, patch_size=16)
        samples.append(SimpleNamespace(patches=torch.from_numpy(patches), grid=grid))
    return samples


def test_trainer_call_writes_on_rank_zero_only_and_survives_a_bad_directory(tmp_path):
    data = fake_dataset(COLOURS[:2])
    records = [record(1, "a blue square", "a blue square"), record(0, "a red circle", "a circle")]
    cs.write_eval_sheet(tmp_path / "other-rank", 5, TOTALS, records, data, FakeLog(enabled=False))
    assert not (tmp_path / "other-rank").exists()
    log = FakeLog(enabled=True)
    cs.write_eval_sheet(tmp_path / "eval", 5, TOTALS, records, data, log)
    sheet = np.asarray(Image.open(tmp_path / "eval" / "step_0000005.png").convert("RGB"))
    first = np.nonzero((sheet == np.array(COLOURS[1], dtype=np.uint8)).all(-1))[1]  # record 0 shows sample 1
    assert len(first) and first.max() < cs.CELL_WIDTH
    assert any("step_0000005.html" in line for line in log.lines)
    (tmp_path / "blocked").write_text("a file where the directory should be")
    log = FakeLog(enabled=True)
    cs.write_eval_sheet(tmp_path / "blocked", 6, TOTALS, records, data, log)  # reported, not raised
    assert any(line.startswith("warning: could not write the caption contact sheet for step 6") for line in log.lines)


def test_tensorboard_gets_the_sheet_as_an_image(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    records = [record(0, "a blue square", "a blue square")]
    cs.write_eval_sheet(tmp_path / "eval", 40, TOTALS, records, fake_dataset(COLOURS[:1]),
                        FakeLog(enabled=True, tb=writer))
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["eval/contact_sheet"]
    (image,) = events.Images("eval/contact_sheet")
    width, height = cs.sheet_size(1)
    assert image.step == 40 and (image.width, image.height) == (width, height)
    shown = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "eval" / "step_0000040.png").convert("RGB")))
