"""The web app (ui/app.py): handlers called directly, the served app through
``gradio_client`` (named endpoints, two sessions at once) and the page in headless
Chromium (Playwright with Debian's ``chromium``; marked ``browser``).

Inversions here use ``ddim`` with 10 steps on the bundled model: the UI is under test,
not the inversion's quality.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from editor import EditOptions, cli, scenes  # noqa: E402
from editor.images import psnr  # noqa: E402
from editor.inversion import Inversion  # noqa: E402
from ui import app  # noqa: E402
from ui.app import Session  # noqa: E402

STEPS = 10
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _noop(*args, **kwargs) -> None:
    """Stands in for gr.Progress when a handler is called outside an event."""


invert = partial(app.invert_image, progress=_noop)
edit = partial(app.edit_image, progress=_noop)
load = partial(app.load_inversion, progress=_noop)


def _edit(ctx, target, session, *, blend=True, blend_words="", reweight="", protect="",
          leakage="replace", mask_threshold=0.5):
    return edit(ctx, target, 0.8, 0.4, blend, blend_words, reweight, protect, leakage,
                mask_threshold, session)


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, str]]:
    return app.example_files()


@pytest.fixture(scope="module")
def ctx(editor, tmp_path_factory) -> app.AppContext:
    return app.make_context(editor, tmp_path_factory.mktemp("ui-downloads"))


@pytest.fixture(scope="module")
def inverted(ctx, examples):
    """The first example (a red circle on white), inverted once for the handler tests."""
    path, caption = examples[0]
    return invert(ctx, path, caption, "ddim", STEPS, 7.5, None)


# -- helpers ------------------------------------------------------------------------------------


def test_parse_reweight_and_words():
    assert app.parse_reweight("red=2, white background = 0.5") == {
        "red": 2.0, "white background": 0.5}
    assert app.parse_reweight("red:1.5") == {"red": 1.5}
    assert app.parse_reweight("  ") is None
    for bad in ("red", "red=x", "=2"):
        with pytest.raises(ValueError, match="word=number"):
            app.parse_reweight(bad)
    assert app.parse_words(" red, ,blue circle ") == ["red", "blue circle"]


def test_display_enlarges_small_images_pixel_for_pixel():
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    big = app.display(img)
    assert big.size == (256, 256)
    assert np.array_equal(np.asarray(big)[::4, ::4], np.asarray(img))
    large = Image.new("RGB", (512, 300))
    assert app.display(large) is large


def test_attention_picture_is_a_heat_map_over_the_source():
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 1.0
    pic = np.asarray(app.attention_picture(amap, Image.new("RGB", (64, 64), "gray")))
    assert pic.shape == (256, 256, 3)
    hot, cold = pic[80:110, 80:110].mean(), pic[200:, 200:].mean()
    assert hot > cold + 50


def test_examples_exist_with_captions(examples):
    assert 4 <= len(examples) <= 8
    for path, caption in examples:
        img = Image.open(path)
        assert img.mode == "RGB" and min(img.size) >= 32
        assert caption.startswith("a ") and "background" in caption


def test_model_line_names_the_model_and_how_to_run_sd15(editor):
    text = app.model_markdown(editor)
    assert editor.fingerprint in text and "shapes" in text
    assert "pivot-edit ui --model" in text and "simple shapes" in text


def test_old_download_folders_are_pruned(ctx):
    old = ctx.workdir / "old-download"
    old.mkdir()
    (old / "edit.png").write_bytes(b"x")
    past = time.time() - app.SESSION_TTL_S - 60
    os.utime(old, (past, past))
    fresh = app._new_file(ctx, "edit.png")
    assert not old.exists() and fresh.parent.is_dir() and fresh.name == "edit.png"


# -- handlers -----------------------------------------------------------------------------------


def test_invert_shows_reconstruction_psnr_and_inversion_file(editor, inverted, examples):
    recon, status, inv_path, gallery, session, target, mask_value = inverted
    assert target == examples[0][1]  # the target box starts as the caption: change a word
    assert mask_value["background"].size == Image.open(examples[0][0]).size
    assert recon.size == (256, 256)  # 64 px shown enlarged
    assert "PSNR" in status and "ddim" in status
    assert gallery == []
    src = Image.open(examples[0][0]).convert("RGB")
    assert session.source.size == src.size
    assert status.count("dB") == 1
    shown = float(status.split("PSNR **")[1].split(" dB")[0])
    assert shown == pytest.approx(psnr(src, session.reconstruction), abs=0.01)
    assert shown > 15  # the reconstruction resembles the input
    inv = Inversion.load(inv_path)
    assert (inv.prompt, inv.method, inv.steps) == (examples[0][1], "ddim", STEPS)
    key = session.key
    assert key[1:] == (examples[0][1], "ddim", STEPS, 7.5, editor.fingerprint, None)
    assert key[0] == inv.image_hash


def test_invert_again_with_the_same_key_reuses_the_inversion(ctx, inverted, examples):
    path, caption = examples[0]
    session = inverted[4]
    again = invert(ctx, path, "  " + caption + " ", "ddim", STEPS, 7.5, session)
    assert again[4] is session and "kept" in again[1]


def test_edit_gives_slider_gallery_maps_and_png(ctx, inverted):
    session = inverted[4]
    target = "a blue circle on a white background"
    (before, after), gallery, maps, png, status, s1, native_png = _edit(ctx, target, session)
    assert Image.open(native_png).size == (64, 64)
    assert before.size == after.size == (256, 256)
    assert np.array_equal(np.asarray(before)[::4, ::4], np.asarray(session.source))
    out = Image.open(png)
    assert out.size == (64, 64)  # the download is the model's own output, not enlarged
    assert np.array_equal(np.asarray(app.display(out)), np.asarray(after))
    assert [c for _, c in gallery] == [target]
    words = [w for _, w in maps]
    assert "blue" in words and "circle" in words
    assert "Edited" in status and s1.inversion is session.inversion
    assert session.edits == []  # the input state is not mutated
    # a second edit of the same inversion joins the gallery, newest first
    second = _edit(ctx, "a red square on a white background", s1)
    assert [c for _, c in second[1]] == ["a red square on a white background", target]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blend_words": "hexagon"}, "hexagon"),
        ({"reweight": "hexagon=2"}, "hexagon"),
        ({"reweight": "blue=two"}, "word=number"),
        ({"protect": "purple sky"}, "purple sky"),
        ({"mask_threshold": 1.5}, "noise_threshold"),
    ],
)
def test_edit_with_unknown_words_is_a_page_error(ctx, inverted, kwargs, message):
    with pytest.raises(gr.Error, match=message):
        _edit(ctx, "a blue circle on a white background", inverted[4], **kwargs)


def test_mask_threshold_reaches_the_automatic_blend(ctx, inverted):
    """The advanced panel's mask threshold is the engine's ``noise_threshold``."""
    target = "a blue circle on a white background"
    inv = inverted[4].inversion
    out = {}
    for thr in (0.8, 0.2):
        png = _edit(ctx, target, inverted[4], mask_threshold=thr)[3]
        out[thr] = np.asarray(Image.open(png).convert("RGB"))
        want = ctx.editor.edit(inv, target, EditOptions(noise_threshold=thr), progress=False).image
        assert np.array_equal(out[thr], np.asarray(want))
    assert not np.array_equal(out[0.8], out[0.2])


def test_bad_input_is_a_page_error(ctx, inverted, examples, tmp_path):
    path, caption = examples[0]
    with pytest.raises(gr.Error, match="No image"):
        invert(ctx, None, caption, "ddim", STEPS, 7.5, None)
    with pytest.raises(gr.Error, match="caption is empty"):
        invert(ctx, path, "   ", "ddim", STEPS, 7.5, None)
    with pytest.raises(gr.Error, match="unknown inversion method"):
        invert(ctx, path, caption, "magic", STEPS, 7.5, None)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    with pytest.raises(gr.Error, match="not a readable image"):
        invert(ctx, str(junk), caption, "ddim", STEPS, 7.5, None)
    for session in (None, Session()):
        with pytest.raises(gr.Error, match="invert an image first"):
            _edit(ctx, "a blue circle on a white background", session)
    with pytest.raises(gr.Error, match="target prompt is empty"):
        _edit(ctx, "", inverted[4])


def test_changing_image_or_caption_forgets_the_inversion(inverted):
    session, status, recon, gallery, file = app.invalidate(inverted[4])
    assert session.inversion is None and session.key is None
    assert "Invert" in status and recon is None and gallery == [] and file is None
    assert inverted[4].inversion is not None  # other sessions' objects untouched
    assert app.invalidate(None)[1] == ""


def test_load_inversion_file_then_edit(ctx, editor, inverted, tmp_path):
    session, caption, method, steps, guidance, recon, status, gallery = load(
        ctx, inverted[2], None)
    assert (caption, method, steps, guidance) == (inverted[4].inversion.prompt, "ddim", STEPS, 7.5)
    assert session.key == inverted[4].key and session.source is None
    assert "Loaded" in status and recon.size == (256, 256)
    # the reloaded inversion reconstructs the same image
    assert np.array_equal(np.asarray(session.reconstruction),
                          np.asarray(inverted[4].reconstruction))
    (before, after), *_ = _edit(ctx, "a green circle on a white background", session)
    # no input image with a file: "before" is the edit's source branch, i.e. the reconstruction
    assert psnr(before, app.display(session.reconstruction)) > 30

    other = Inversion.load(inverted[2])
    other.model_fingerprint = "0" * 16
    foreign = other.save(tmp_path / "foreign.safetensors")
    with pytest.raises(gr.Error, match="made with model"):
        load(ctx, str(foreign), None)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(gr.Error, match="not a pivot-edit inversion"):
        load(ctx, str(junk), None)
    with pytest.raises(gr.Error, match="No inversion file"):
        load(ctx, None, None)


# -- the CLI ------------------------------------------------------------------------------------


def test_parse_auth():
    assert cli.parse_auth("ann:s3cret:x") == ("ann", "s3cret:x")
    assert cli.parse_auth(None) is None
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            cli.parse_auth(bad)


def test_cli_ui_serves_on_loopback_by_default(monkeypatch, editor):
    calls = {}

    class FakeDemo:
        def launch(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setattr(cli, "load_editor", lambda args: editor)
    monkeypatch.setattr(app, "build_demo", lambda ed: FakeDemo())
    assert cli.main(["ui", "--model", "shapes"]) == 0
    assert calls["server_name"] == "127.0.0.1" and calls["server_port"] == 7860
    assert calls["share"] is False and calls["auth"] is None
    assert calls["max_file_size"] == "10mb"
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert cli.main(["ui", "--model", "shapes", "--auth", "ann:pw", "--port", "8000",
                     "--max-file-size", "2mb"]) == 0
    assert calls["auth"] == ("ann", "pw") and calls["server_port"] == 8000
    assert calls["max_file_size"] == "2mb"


def test_cli_ui_rejects_bad_auth_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_editor", lambda args: pytest.fail("loaded the model"))
    assert cli.main(["ui", "--auth", "nopassword"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


# -- the served app -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(editor, tmp_path_factory):
    """The app launched in this process on a free loopback port; yields its URL."""
    demo = app.build_demo(editor, workdir=tmp_path_factory.mktemp("served"), method="ddim",
                          steps=STEPS)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(),
                quiet=True, css=app.CSS)
    yield demo.local_url
    demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_client_invert_then_edit_through_named_endpoints(served, examples):
    from gradio_client import handle_file

    client = _client(served)
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/invert", "/edit"} <= set(named)
    path, caption = examples[0]
    recon, status, inv_file, gallery, prefilled, mask_value = client.predict(
        handle_file(path), caption, "ddim", STEPS, 7.5, api_name="/invert")
    assert prefilled == caption
    assert "PSNR" in status and Path(recon).is_file()
    assert Inversion.load(inv_file).prompt == caption
    target = "a blue circle on a white background"
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="hexagon"):
        client.predict(target, blend_words="hexagon", api_name="/edit")
    # the error left the session's inversion in place
    slider, gallery, maps, png, status, native_png = client.predict(target, api_name="/edit")
    assert "Edited" in status
    assert len(slider) == 2 and all(Path(p).is_file() for p in slider)
    assert [g["caption"] for g in gallery] == [target]
    assert "blue" in [m["caption"] for m in maps]
    assert Image.open(png).size == Image.open(path).size


def test_invert_reports_tqdm_progress_to_the_client(served, examples):
    """gr.Progress(track_tqdm=True) forwards the engine's tqdm bars to the page/client."""
    from gradio_client import handle_file

    path, caption = examples[3]
    job = _client(served).submit(handle_file(path), caption, "ddim", 20, 7.5, api_name="/invert")
    seen = []
    while not job.done():
        for unit in job.status().progress_data or []:
            seen.append((unit.desc, unit.index, unit.length))
        time.sleep(0.02)
    assert "PSNR" in job.result()[1]
    # one bar over the whole job (inversion, then the reconstruction), filling once
    assert {d for d, _, _ in seen} <= {"ddim inversion", "reconstruction"}, seen
    assert "ddim inversion" in {d for d, _, _ in seen}, seen
    assert {n for _, _, n in seen} == {40}, seen  # 20 inversion + 20 reconstruction steps
    done = [i for _, i, _ in seen]
    assert done == sorted(done), seen


def test_two_sessions_each_get_their_own_result(served, examples):
    """Two clients invert and edit at once. Each must get an edit of its own image, and
    the jobs must not overlap on the shared model (an edit's attention processors on the
    UNet would break an inversion running beside it: all model events share one queue)."""
    from gradio_client import handle_file

    (path_a, cap_a), (path_b, cap_b) = examples[0], examples[2]  # white vs black background
    clients = [_client(served), _client(served)]
    with pytest.raises(Exception, match="invert an image first"):
        clients[1].predict("a blue circle on a white background", api_name="/edit")

    def run(client, path, caption, target):
        client.predict(handle_file(path), caption, "ddim", STEPS, 7.5, api_name="/invert")
        return client.predict(target, api_name="/edit")[3]

    targets = ("a blue circle on a white background", cap_b.replace("yellow", "red"))
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run, c, p, cap, t) for c, p, cap, t in
                zip(clients, (path_a, path_b), (cap_a, cap_b), targets, strict=True)]
        out_a, out_b = (Image.open(j.result(timeout=300)).convert("RGB") for j in jobs)
    src_a, src_b = (Image.open(p).convert("RGB") for p in (path_a, path_b))
    assert psnr(out_a, src_a) > psnr(out_a, src_b) + 3
    assert psnr(out_b, src_b) > psnr(out_b, src_a) + 3


def test_served_app_refuses_bad_input_with_a_message(served, examples, tmp_path, editor):
    """Through the API, as a hostile client would: each bad input gets its own message (a
    ``gr.Error``, never Gradio's bare "Error"), and the app keeps serving."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = _client(served)
    path, caption = examples[0]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9_000, 9_000)).save(bomb)  # 81 MP in a few hundred KB
    bad_inv = tmp_path / "bad.safetensors"
    bad_inv.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 32)
    cases = [
        ((handle_file(str(junk)), caption, "ddim", STEPS, 7.5), "/invert",
         "not an image this app can read"),
        ((handle_file(str(bomb)), caption, "ddim", STEPS, 7.5), "/invert",
         "pivot-edit reads images up to 50 MP"),
        ((handle_file(path), caption, "ddim", 10**6, 7.5), "/invert",  # Gradio checks bounds
         "steps must be an integer in 1..1000|greater than maximum value 100"),
        ((handle_file(path), caption, "ddim", 10.5, 7.5), "/invert", "steps must be a whole number"),
        ((handle_file(path), caption, "ddim", STEPS, 1e9), "/invert",
         "guidance must be in|greater than maximum value 15"),
        ((handle_file(path), caption, "magic", STEPS, 7.5), "/invert",
         "unknown inversion method|not in the list of choices"),
        ((handle_file(str(bad_inv)),), "/load_inversion", "not a pivot-edit inversion"),
    ]
    for args, endpoint, words in cases:
        with pytest.raises(AppError, match=words):
            client.predict(*args, api_name=endpoint)
    client.predict(handle_file(path), caption, "ddim", STEPS, 7.5, api_name="/invert")
    for kwargs, words in (({"cross_replace": 7.0},
                           "cross_replace must lie in|greater than maximum value 1"),
                          ({"reweight": "blue=1e30"}, "reweight factor for 'blue'")):
        with pytest.raises(AppError, match=words):
            client.predict("a blue circle on a white background", api_name="/edit", **kwargs)
    assert "PSNR" in client.predict(handle_file(path), caption, "ddim", STEPS, 7.5,
                                    api_name="/invert")[1]


def test_non_finite_values_reach_the_handlers_as_page_errors(ctx, inverted, examples):
    """gradio_client cannot send NaN (not JSON), a raw HTTP client can: the handlers refuse
    them with the engine's message."""
    path, caption = examples[0]
    with pytest.raises(gr.Error, match="guidance must be a finite number"):
        invert(ctx, path, caption, "ddim", STEPS, float("nan"), None)
    with pytest.raises(gr.Error, match="steps must be a whole number"):
        invert(ctx, path, caption, "ddim", float("inf"), 7.5, None)
    with pytest.raises(gr.Error, match="noise_threshold must be a finite number"):
        _edit(ctx, "a blue circle on a white background", inverted[4], mask_threshold=float("nan"))


def test_a_received_inversions_prompt_is_shown_as_plain_text(ctx, inverted, tmp_path):
    """A file can carry any prompt; the page shows it as text: no link, image or markup."""
    inv = Inversion.load(inverted[2])
    inv.prompt = "a red circle [click me](http://example.invalid) ![x](http://example.invalid/x.png)"
    path = inv.save(tmp_path / "tricky.safetensors")
    status = load(ctx, str(path), None)[6]
    assert "](http" not in status and "\\[click me\\]" in status and "\\!\\[x\\]" in status
    assert app.plain("<img src=x onerror=alert(1)>") == "\\<img src=x onerror=alert\\(1\\)\\>"


# -- the page in a browser ---------------------------------------------------------------------


def _playwright():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download)")
    return sync_playwright


def _browser(p, width: int = 1280):
    browser = p.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": width, "height": 1500}, accept_downloads=True)
    page.set_default_timeout(120_000)
    return browser, page


def _keep_screenshot(shot: Path, name: str) -> None:
    """Screenshots go to ``$PIVOT_EDIT_SCREENSHOTS`` when it is set (docs/images when the
    docs' pictures are remade), else they stay in the test's temporary folder."""
    folder = os.environ.get("PIVOT_EDIT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(folder) / name)
    print(f"screenshot: {shot}", file=sys.stderr)


def _invert_in_page(page, url, path, caption):
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.locator("#caption textarea").fill(caption)
    page.locator("#invert").click()
    page.get_by_text("Reconstruction PSNR").wait_for()


@pytest.mark.browser
def test_browser_upload_invert_edit_and_screenshot(served, examples, tmp_path):
    sync_playwright = _playwright()
    path, caption = examples[0]
    target = "a blue circle on a white background"
    with sync_playwright() as p:
        browser, page = _browser(p)
        try:
            _invert_in_page(page, served, path, caption)
            page.locator("#reconstruction img").wait_for()
            # the target starts as the caption: an edit is "change a word"
            assert page.locator("#target textarea").input_value() == caption
            page.locator("#target textarea").fill(target)
            page.locator("#edit").click()
            page.locator("#slider img").first.wait_for()
            page.get_by_text("Edited to").wait_for()
            assert page.locator("#edits img").count() >= 1
            assert page.locator("#attention img").count() >= 3
            # a refused input keeps the last good results on the page
            page.locator("#advanced").get_by_text("Advanced").click()
            page.get_by_label("Reweight (word=factor, comma-separated)").fill("blue=x")
            page.locator("#edit").click()
            page.get_by_text("Not done").wait_for()
            assert "word=number" in page.locator("#status").inner_text()
            assert page.locator("#slider img").count() == 2
            assert page.locator("#slider").get_by_text("Error").count() == 0
            assert page.locator("#invert").is_enabled() and page.locator("#edit").is_enabled()
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] >= 1000
    _keep_screenshot(shot, "ui.png")


def _framed_photo(size=(451, 300)) -> Image.Image:
    """A non-square picture with a coloured frame on each side (to see what is cropped)."""
    w, h = size
    img = Image.new("RGB", size, (128, 128, 128))
    for box, rgb in (((0, 0, 12, h), (255, 0, 0)), ((w - 12, 0, w, h), (0, 0, 255)),
                     ((0, 0, w, 12), (0, 255, 0)), ((0, h - 12, w, h), (255, 255, 0))):
        img.paste(rgb, box)
    return img


@pytest.mark.browser
def test_browser_slider_shows_whole_non_square_images_and_a_narrow_page_fits(served, tmp_path):
    sync_playwright = _playwright()
    photo = tmp_path / "wide.png"
    _framed_photo().save(photo)
    caption = "a red square on a gray background"
    with sync_playwright() as p:
        browser, page = _browser(p)
        try:
            _invert_in_page(page, served, photo, caption)
            page.locator("#target textarea").fill("a blue square on a gray background")
            page.locator("#edit").click()
            page.get_by_text("Edited to").wait_for()
            page.locator("#slider img").first.wait_for()
            time.sleep(0.5)
            shot = tmp_path / "slider.png"
            page.locator("#slider").screenshot(path=str(shot))
            arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
            seen = {name: bool((np.abs(arr - rgb).sum(-1) < 60).sum() > 50)
                    for name, rgb in (("left", (255, 0, 0)), ("right", (0, 0, 255)),
                                      ("top", (0, 255, 0)), ("bottom", (255, 255, 0)))}
            assert all(seen.values()), seen  # every side of the picture is on screen
        finally:
            browser.close()
        browser, page = _browser(p, width=400)
        try:
            page.goto(served)
            page.locator("#target textarea").wait_for()
            box = page.locator("#target textarea").bounding_box()
            assert box["width"] >= 300, box  # the target box takes the page's width
            shot = tmp_path / "narrow.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    _keep_screenshot(shot, "ui_narrow.png")


@pytest.mark.browser
def test_browser_busy_buttons_and_cancel(served, examples, tmp_path):
    sync_playwright = _playwright()
    path, caption = examples[1]
    with sync_playwright() as p:
        browser, page = _browser(p)
        try:
            page.goto(served)
            page.locator("#image input[type=file]").set_input_files(str(path))
            page.locator("#caption textarea").fill(caption)
            page.get_by_label("Steps").first.fill("100")
            page.locator("#method input").fill("null-text")
            page.locator("#method input").press("Enter")
            page.locator("#invert").click()
            page.wait_for_function("document.querySelector('#invert').disabled === true")
            assert page.locator("#edit").is_disabled()  # no second job while one runs
            page.locator("#cancel-invert").click()
            page.locator("#status").get_by_text("Not done: Cancelled.").wait_for()
            page.wait_for_function("document.querySelector('#invert').disabled === false")
            assert page.locator("#cancel-invert").is_disabled()
        finally:
            browser.close()


def _two_objects_upload(tmp_path):
    """A 300x200 two-object scene saved as an upload, a colour neither object has, and the
    caption with the left object's colour changed to it."""
    sc = scenes.sample(70_003, n_objects=2).scene
    photo, masks = scenes.render_at(sc, 300, 200)
    path = tmp_path / "two.png"
    photo.save(path)
    left, right = sc.objects
    new = next(c for c in ("green", "yellow", "red", "blue") if c not in (left.color, right.color))
    target = sc.caption().replace(f"{left.color} {left.shape}", f"{new} {left.shape}", 1)
    return sc, photo, masks, path, new, target


def test_a_brushed_editor_value_edits_at_full_size_inside_the_strokes(ctx, tmp_path):
    """The mask editor's value as the browser sends it (the upload as background, one RGBA
    layer of brush strokes over the left object of a 300x200 scene): the edit comes back at
    300x200, the painted object changed colour, the other did not, and pixels far from the
    strokes are the upload's own. (The browser test below paints the same through the page;
    it is slow because headless Chromium's canvas is.)"""
    from PIL import ImageDraw

    sc, photo, masks, path, new, target = _two_objects_upload(tmp_path)
    left, right = sc.objects
    session = invert(ctx, str(path), sc.caption(), "ddim", STEPS, 7.5, None)[4]
    layer = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ox, oy = left.center[0] * 300 / 64, left.center[1] * 200 / 64
    r = left.radius * 200 / 64 + 6
    for dy in range(-int(r), int(r) + 1, 6):  # brush rows 8 px wide (Gradio's auto radius 4)
        draw.line([(ox - r, oy + dy), (ox + r, oy + dy)], fill=(255, 0, 128, 153), width=8)
    value = {"background": photo, "layers": [layer], "composite": photo}
    *_, png, status, _, _native = edit(ctx, target, 0.8, 0.4, True, "", "", "", "replace", 0.5,
                                       session, value)
    out = Image.open(png).convert("RGB")
    assert out.size == photo.size == (300, 200)
    assert scenes.classify_color(out, masks[0] > 0.5) == new
    assert scenes.classify_color(out, masks[1] > 0.5) == right.color
    assert np.array_equal(np.asarray(out)[:, 200:], np.asarray(photo)[:, 200:])


@pytest.mark.slow
@pytest.mark.browser
def test_browser_brush_a_mask_edit_and_download_at_full_size(served, tmp_path):
    """Upload a two-object scene larger than the model's size, paint over the left object,
    invert, change its colour, download: the file has the upload's size, the painted
    object changed, the other one did not."""
    sync_playwright = _playwright()
    sc, photo, masks, path, new, target = _two_objects_upload(tmp_path)
    left, right = sc.objects
    with sync_playwright() as p:
        browser, page = _browser(p)
        try:
            _invert_in_page(page, served, path, sc.caption())
            page.locator("#mask-panel").get_by_text("Where the edit may act").click()
            canvas = page.locator("#mask-editor canvas").first
            canvas.wait_for()
            time.sleep(1.0)
            page.locator("#mask-editor").get_by_label("Brush").first.click()
            # where the editor shows the picture: its dark pixels in a screenshot
            ed_shot = tmp_path / "editor.png"
            page.locator("#mask-editor").screenshot(path=str(ed_shot))
            dark = np.asarray(Image.open(ed_shot).convert("L")) < 60  # the scene is dark
            xs = np.nonzero(dark.mean(0) > 0.3)[0]  # columns and rows mostly picture
            ys = np.nonzero(dark.mean(1) > 0.3)[0]  # (not the toolbar's dark icons)
            box = page.locator("#mask-editor").bounding_box()
            x0, y0 = box["x"] + xs.min(), box["y"] + ys.min()
            k = (xs.max() - xs.min() + 1) / 300  # screen pixels per image pixel
            assert abs((ys.max() - ys.min() + 1) / 200 - k) < 0.05 * k
            ox, oy = left.center[0] * 300 / 64, left.center[1] * 200 / 64
            r = left.radius * 200 / 64 + 6
            for dy in range(-int(r), int(r) + 1, 3):  # paint rows across the left object
                page.mouse.move(x0 + (ox - r) * k, y0 + (oy + dy) * k)
                page.mouse.down()
                page.mouse.move(x0 + (ox + r) * k, y0 + (oy + dy) * k, steps=8)
                page.mouse.up()
            page.locator("#target textarea").fill(target)
            page.locator("#edit").click()
            page.get_by_text("Edited to").wait_for()
            with page.expect_download() as dl:
                page.locator("#edit-download").click()
            got = tmp_path / "downloaded.png"
            dl.value.save_as(str(got))
            shot = tmp_path / "mask.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    out = Image.open(got).convert("RGB")
    assert out.size == photo.size == (300, 200)
    assert scenes.classify_color(out, masks[0] > 0.5) == new
    assert scenes.classify_color(out, masks[1] > 0.5) == right.color
    far_right = np.zeros((200, 300), bool)
    far_right[:, 200:] = True  # nowhere near the painted strokes
    assert np.array_equal(np.asarray(out)[far_right], np.asarray(photo)[far_right])
    _keep_screenshot(shot, "ui_mask.png")


def test_a_closed_tab_stops_its_job_and_cancel_stops_the_next_step(ctx, examples):
    """Cancel (and a session whose tab went away) set the session's flag: the running job
    stops at its next step with "Cancelled."."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    path, caption = examples[1]
    request = SimpleNamespace(session_hash="tab-1")
    started = []

    def progress(*args, **kwargs):
        started.append(args)

    def job():
        return app.invert_image.__wrapped__(ctx, path, caption, "null-text", 60, 7.5, None,
                                            request=request, progress=progress)

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(job)
        while not started:
            time.sleep(0.01)
        app.session_closed(ctx, request)  # the tab closed
        with pytest.raises(Exception, match="cancelled after"):
            fut.result(timeout=120)
    assert "tab-1" not in ctx.cancels
    assert app.cancel_job(ctx, request) == "Cancelling..." and ctx.cancels["tab-1"].is_set()


def test_the_model_banner_says_when_auto_fell_back(editor, monkeypatch):
    monkeypatch.setattr(editor.model, "notice", "notice: the hub is unreachable; using the "
                        "bundled 'shapes' model")
    text = app.model_markdown(editor)
    assert "the hub is unreachable" in text and "--model" in text and "single-file" in text


def test_expected_input_errors_log_one_line_without_a_traceback(ctx, inverted, caplog, capsys):
    import logging

    with caplog.at_level(logging.INFO, logger="pivot-edit.ui"), pytest.raises(gr.Error):
        _edit(ctx, "a blue circle on a white background", inverted[4], reweight="blue=x")
    lines = [r for r in caplog.records if r.name == "pivot-edit.ui"]
    assert len(lines) == 1 and "word=number" in lines[0].getMessage()
    assert lines[0].exc_info is None and "Traceback" not in capsys.readouterr().err


def test_the_app_subclasses_no_gradio_component():
    """Gradio writes a ``.pyi`` next to the module of every Component subclass: an installed
    app must not write into its own package (nor fail to import where that is read-only)."""
    own = [name for name, obj in vars(app).items()
           if isinstance(obj, type) and issubclass(obj, gr.components.Component)
           and obj.__module__ == app.__name__]
    assert own == []
    assert not Path(app.__file__).with_suffix(".pyi").exists()
