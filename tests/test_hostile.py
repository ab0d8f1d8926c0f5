"""Hostile and broken input: a clear error every time, nothing lost, nothing let in.

One test (or parametrized case) per case of the hardening review: data loss and security,
resource exhaustion, crashes that were tracebacks, silent wrong results. The served web
app's cases are in tests/test_ui.py (``test_served_app_refuses_bad_input``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from editor import Editor, InvertOptions, scenes
from editor.batch import ManifestError, read_manifest, run_batch
from editor.cli import main as cli_main
from editor.fileio import OutputLock, clean_temporaries, temporary_path
from editor.images import MAX_IMAGE_PIXELS, load_image
from editor.inversion import FORMAT, Inversion
from editor.model import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inversion(editor, tmp_path_factory) -> tuple[Inversion, Path]:
    s = scenes.sample(101, n_objects=1)
    inv = editor.invert(s.image, s.caption, InvertOptions(method="ddim", steps=4), progress=False)
    return inv, inv.save(tmp_path_factory.mktemp("inv") / "inv.safetensors")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- data loss and security ----------------------------------------------------------------------


def test_an_inversion_file_never_chooses_the_model(inversion, tmp_path, capsys, monkeypatch):
    """``edit`` / ``reconstruct`` load the configured model, not the file's ``model_id``; the
    file's model is only a hint in the message, or loaded with an explicit flag that says so."""
    inv, _ = inversion
    evil = Inversion(**{**inv.__dict__, "model_id": "someone/else-model",
                        "model_fingerprint": "0" * 16}).save(tmp_path / "evil.safetensors")
    loaded = []
    real = Editor.load

    def spy(options):
        loaded.append(options.model)
        if options.model == "someone/else-model":
            raise ValueError("could not load 'someone/else-model' (the test stops here)")
        return real(options)

    monkeypatch.setattr("editor.facade.Editor.load", spy)
    monkeypatch.setenv("PIVOT_EDIT_MODEL", "shapes")
    out = tmp_path / "o.png"
    for cmd in (["edit", str(evil), "--target", inv.prompt, "-o", str(out)],
                ["reconstruct", str(evil), "-o", str(out)]):
        from editor.cli import build_parser  # the env default is read when the parser is built

        assert build_parser().parse_args(cmd).model == "shapes"
        assert cli_main(cmd) == 2
        err = capsys.readouterr().err
        assert "made with model 'someone/else-model'" in err and "--model-from-inversion" in err
        assert not out.exists()
    assert loaded == ["shapes", "shapes"]
    assert cli_main(["edit", str(evil), "--target", inv.prompt, "-o", str(out),
                     "--model-from-inversion"]) == 2
    err = capsys.readouterr().err
    assert "loading the model the inversion file names: 'someone/else-model'" in err
    assert loaded[-1] == "someone/else-model"


def test_two_batch_runs_on_one_out_folder_refuse_each_other(tmp_path, capsys):
    from tests_support import fake_editor_and_manifest

    fake, manifest = fake_editor_and_manifest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, "pivot-edit batch run"):  # another run holds the folder
        with pytest.raises(ValueError, match=r"another pivot-edit batch run is writing to .*pid "
                                             rf"{os.getpid()}"):
            run_batch(fake, read_manifest(manifest), out, progress=False)
        assert not (out / "summary.json").exists()
    assert run_batch(fake, read_manifest(manifest), out, progress=False).exit_status == 0


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    from tests_support import fake_editor_and_manifest

    fake, manifest = fake_editor_and_manifest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from editor.fileio import OutputLock; OutputLock(sys.argv[2]).acquire();"
         "print('held', flush=True); time.sleep(60)", str(ROOT), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another"):
            run_batch(fake, read_manifest(manifest), out, progress=False)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert run_batch(fake, read_manifest(manifest), out, progress=False).exit_status == 0


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    live = temporary_path(tmp_path / "a.png")  # this process: alive
    live.write_bytes(b"being written")
    dead = live.with_name(live.name.replace(f"-{os.getpid()}.", f"-{_dead_pid()}."))
    dead.write_bytes(b"left by a killed run")
    other_host = tmp_path / ".b.png.00000000-1.tmp"  # another machine's, recent
    other_host.write_bytes(b"a cluster worker's")
    assert clean_temporaries(tmp_path) == [dead]
    assert live.exists() and other_host.exists()


def test_fingerprint_identifies_the_weights_not_where_they_live(editor, tmp_path):
    copy = tmp_path / "copy-of-shapes"
    shutil.copytree(bundled_model_path(), copy)
    moved = Editor.from_pretrained(str(copy), device="cpu")
    assert moved.fingerprint == editor.fingerprint  # a moved folder keeps its inversions
    with torch.no_grad():
        params = list(moved.pipe.unet.parameters())[:314]
        for p in params:
            p.mul_(1.5)
    moved.model.__dict__.pop("fingerprint", None)  # recompute: the weights changed
    assert moved.fingerprint != editor.fingerprint
    with torch.no_grad():  # one value of one tensor is enough
        for p in params:
            p.div_(1.5)
        next(iter(moved.pipe.vae.parameters())).view(-1)[123] += 1e-2
    moved.model.__dict__.pop("fingerprint", None)
    assert moved.fingerprint != editor.fingerprint


@pytest.mark.parametrize("bad_id, words", [
    ("ok\n", "must be 1-128 letters"), ("summary.json", "name the runner uses"),
    (".cache", "must be 1-128 letters"), ("SUMMARY.JSON", "name the runner uses"),
    ("a" * 200, "must be 1-128 letters"),
])
def test_manifest_ids_cannot_escape_or_collide(tmp_path, bad_id, words):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": bad_id, "image": "a.png", "prompt": "p", "edits": ["t"]}))
    with pytest.raises(ManifestError, match=words):
        read_manifest(m)


def test_control_characters_are_never_printed_raw(tmp_path, capsys):
    scenes.sample(1).image.save(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "prompt": "a red\x1b[2J circle\r",
                             "edits": ["a \x1b]0;owned\x07blue circle"]}))
    assert cli_main(["batch", str(m), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "prompt": "p", "edits": ["t"],
                               "method": "\x1b[31mevil"}))
    assert cli_main(["batch", str(bad), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "evil" in err


# -- resource exhaustion -------------------------------------------------------------------------


def _peak_rss_growth_mb(setup: str, code: str) -> tuple[float, str]:
    """Run ``setup`` then ``code`` in a fresh interpreter; how much ``code`` raised the
    process's peak RSS (MB), and its stdout."""
    peak = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
    wrapped = (f"import sys, resource; sys.path.insert(0, {str(ROOT)!r})\n{setup}\n"
               f"before = {peak}\n{code}\nprint('GROWTH', {peak} - before)")
    res = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return float(res.stdout.strip().splitlines()[-1].split()[1]), res.stdout


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (13_000, 13_000)).save(bomb)  # ~0.3 MB file, 169 MP
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ValueError, match=r"13000 x 13000 pixels \(169\.0 MP\); pivot-edit reads "
                                         r"images up to 50 MP"):
        load_image(bomb)
    growth, out = _peak_rss_growth_mb(
        "from editor.images import load_image",
        f"try:\n    load_image({str(bomb)!r})\nexcept ValueError as e:\n    print('refused', e)")
    assert "refused" in out and growth < 50, growth  # decoding it would take 169 MB (L) alone


def test_extreme_aspect_ratios_are_refused(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 60_000)).save(strip)
    with pytest.raises(ValueError, match=r"aspect ratio of 60000\.0:1; pivot-edit takes images up "
                                         r"to 8:1"):
        load_image(strip)
    with pytest.raises(ValueError, match="aspect ratio"):
        load_image(Image.new("RGB", (900, 100)))


def test_a_huge_jpeg_is_decoded_reduced_to_fit(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (8_400, 6_300), (200, 30, 30)).save(big, quality=80)  # 52.9 MP
    img = load_image(big)
    assert img.size[0] * img.size[1] <= MAX_IMAGE_PIXELS and img.size == (4_200, 3_150)


def test_yaml_billion_laughs_is_refused_quickly(tmp_path):
    lol = ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    for k in "bcdefghi":
        prev = chr(ord(k) - 1)
        lol.append(f"{k}: &{k} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    m = tmp_path / "lol.yaml"
    m.write_text("\n".join(lol) + "\nitems: [{image: a.png, prompt: p, edits: [*i]}]\n")
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match=r"YAML aliases \(\*a\) are not allowed") as err:
        read_manifest(m)
    assert time.perf_counter() - t0 < 5 and err.value.line == 2


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    m = tmp_path / "huge.jsonl"
    with open(m, "wb") as f:  # sparse: 65 MB on paper, nothing on disk
        f.seek(65 * 2**20)
        f.write(b"\n")
    with pytest.raises(ManifestError, match="manifests are read up to 64 MB"):
        read_manifest(m)


# -- inversion files: every defect a ValueError naming the file and the field --------------------


def _write_inversion(path: Path, meta, tensors: dict[str, torch.Tensor]) -> Path:
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors, str(path), metadata={"pivot_edit": raw})
    return path


@pytest.mark.parametrize("change, field", [
    ("not json", "metadata is not JSON"),
    ("[1, 2]", "metadata is not a JSON object"),
    ({"drop": "prompt"}, "'prompt' is missing"),
    ({"drop": "steps"}, "'steps' is missing"),
    ({"set": ("steps", "four")}, "'steps' has the wrong type"),
    ({"set": ("steps", True)}, "'steps' has the wrong type"),
    ({"set": ("steps", 10**9)}, "'steps' has an impossible value"),
    ({"set": ("guidance", 1e308)}, "'guidance' has an impossible value"),
    ({"set": ("method", "magic")}, "'method' has an impossible value"),
    ({"set": ("timesteps", [1, 2])}, "'timesteps' has an impossible value"),
    ({"set": ("image_size", [64])}, "'image_size' has an impossible value"),
    ({"set": ("prompt", "")}, "'prompt' has an impossible value"),
    ({"set": ("stats", [1])}, "'stats' is not an object"),
    ({"set": ("version", 99)}, "unsupported inversion format"),
    ({"tensor": ("z_T", torch.zeros(4, 8, 8))}, "'z_T' has shape"),
    ({"tensor": ("z_T", torch.zeros(1, 4, 8, 8, dtype=torch.int32))}, "'z_T' has dtype int32"),
    ({"tensor": ("z_T", torch.full((1, 4, 8, 8), float("nan")))}, "'z_T' holds NaN"),
    ({"tensor": ("uncond", torch.zeros(3, 77, 64))}, "'uncond' has shape"),
    ({"tensor": ("uncond", torch.full((1, 77, 64), float("inf")))}, "'uncond' holds NaN"),
    ({"tensor": ("offsets", torch.zeros(4, 1, 4, 8, 8))}, "'offsets' is present"),
    ({"tensor": ("extra", torch.zeros(1))}, "'extra' is not a tensor"),
    ({"drop_tensor": "uncond"}, "'uncond' (a tensor) is missing"),
])
def test_inversion_files_are_validated_when_read(inversion, tmp_path, change, field):
    inv, good = inversion
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["pivot_edit"])
    tensors = load_file(str(good))
    if isinstance(change, str):
        meta = change
    elif "drop" in change:
        meta.pop(change["drop"])
    elif "set" in change:
        meta[change["set"][0]] = change["set"][1]
    elif "tensor" in change:
        tensors[change["tensor"][0]] = change["tensor"][1]
    else:
        tensors.pop(change["drop_tensor"])
    path = _write_inversion(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ValueError) as err:
        Inversion.load(path)
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)


def test_a_null_text_file_with_too_few_null_rows_is_refused(editor, tmp_path):
    s = scenes.sample(102, n_objects=1)
    inv = editor.invert(s.image, s.caption, InvertOptions(steps=3, num_inner_steps=1),
                        progress=False)
    inv.uncond = inv.uncond[:1]
    path = inv.save(tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match="'uncond' has 1 rows; a null-text inversion of 3 steps"):
        Inversion.load(path)
    assert FORMAT == "pivot-edit/inversion"


# -- outputs: checked before any work, one line, no temporaries ----------------------------------


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores permissions: then /proc/self)."""
    if os.geteuid() == 0:
        return Path("/proc/self")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


def test_bad_output_paths_fail_before_any_work(inversion, tmp_path, capsys, monkeypatch):
    inv, path = inversion
    monkeypatch.setattr("editor.cli.load_editor",
                        lambda *a, **k: pytest.fail("the model was loaded before the outputs "
                                                    "were checked"))
    scenes.sample(1).image.save(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "prompt": "p", "edits": ["t"]}))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    folder_png = tmp_path / "folder.png"
    folder_png.mkdir()
    ro = _unwritable(tmp_path)
    cases = [
        (["batch", str(m), "--out", str(a_file)], "is a file, not a folder"),
        (["batch", str(m), "--out", str(ro / "sub")], "cannot be created"),
        (["batch", str(m), "--out", str(ro)], "not writable"),
        (["compare", "--manifest", str(m), "--out", str(a_file)], "is a file, not a folder"),
        (["generate", "p", "-o", str(folder_png)], "is a folder"),
        (["invert", str(tmp_path / "a.png"), "--prompt", "p", "-o",
          str(tmp_path / "x.safetensors" / "")], "is a folder"),
        (["reconstruct", str(path), "-o", str(folder_png)], "is a folder"),
        (["edit", str(path), "--target", "t", "-o", str(tmp_path / "nowhere" / "e.png")],
         "does not exist"),  # (edit -o FOLDER is the folder form: edit.png inside it)
        (["edit", str(path), "--target", "t", "-o", str(tmp_path / "ok.png"),
          "--source", str(tmp_path / "no-such-dir" / "src.png")], "--source folder"),
        (["edit", str(path), "--target", "t", "-o", str(tmp_path / "ok.png"),
          "--source", str(folder_png)], "is a folder"),
    ]
    (tmp_path / "x.safetensors").mkdir()
    for argv, words in cases:
        if argv[0] == "compare":
            monkeypatch.setattr("editor.compare.run_compare", lambda *a, **k: pytest.fail("ran"))
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "ok.png").exists()


@pytest.mark.parametrize("argv, words", [
    (["ui", "--max-file-size", "abc"], "--max-file-size must be a size such as 10mb"),
    (["ui", "--max-file-size=-5mb"], "--max-file-size must be a size"),
    (["ui", "--host", "256.1.1.1"], "--host must be an IP address"),
    (["ui", "--host", "bad host!"], "--host must be an IP address"),
])
def test_bad_web_app_flags_are_one_line_errors(argv, words, capsys, monkeypatch):
    monkeypatch.setattr("editor.cli.load_editor", lambda *a, **k: pytest.fail("model loaded"))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


# -- silent wrong results ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["generate", "a red circle on a white background", "--guidance", "nan"],
    ["generate", "a red circle on a white background", "--guidance", "inf"],
    ["generate", "a red circle on a white background", "--steps", "-1"],
    ["invert", "IMG", "--prompt", "a red circle", "--guidance", "nan"],
    ["invert", "IMG", "--prompt", "a red circle", "--inner-steps", "0"],
])
def test_non_finite_or_out_of_range_numbers_are_refused_on_the_command_line(argv, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.setattr("editor.cli.load_editor", lambda *a, **k: pytest.fail("model loaded"))
    scenes.sample(1).image.save(tmp_path / "a.png")
    argv = [str(tmp_path / "a.png") if a == "IMG" else a for a in argv]
    suffix = ".safetensors" if argv[0] == "invert" else ".png"
    assert cli_main([*argv, "-o", str(tmp_path / f"out{suffix}")]) == 2
    err = capsys.readouterr().err
    assert "must be" in err and not (tmp_path / f"out{suffix}").exists()


def test_engine_refuses_nan_guidance_in_every_verb(editor, inversion):
    from editor import EditOptions, GenerateOptions

    inv, _ = inversion
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        editor.generate("a red circle on a white background", GenerateOptions(guidance=math.nan))
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        editor.invert(scenes.sample(1).image, "a red circle", InvertOptions(guidance=math.inf))
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        editor.edit(inv, inv.prompt, EditOptions(guidance=math.nan))
    with pytest.raises(ValueError, match="max_pixels must be an integer"):
        InvertOptions(max_pixels=-1)


def test_a_dark_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64) % 201).astype(np.uint16)  # 0..200 of 65535: black
    Image.fromarray(a).save(tmp_path / "dark16.png")
    img = np.asarray(load_image(tmp_path / "dark16.png"))
    assert img.max() <= 1  # 200 / 257; the old contrast stretch made it 255
    bright = np.full((8, 8), 65535, np.uint16)
    Image.fromarray(bright).save(tmp_path / "white16.png")
    assert np.asarray(load_image(tmp_path / "white16.png")).min() == 255


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="is a folder, not an inversion file"):
        Inversion.load(tmp_path)
    with pytest.raises(ManifestError, match="is a folder, not a manifest file"):
        read_manifest(tmp_path)
