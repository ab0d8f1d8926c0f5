"""`pivot-edit invert` and `pivot-edit reconstruct` through the CLI entry point."""

from __future__ import annotations

import numpy as np
from PIL import Image

from editor import scenes
from editor.cli import main
from editor.images import psnr
from editor.inversion import Inversion


def test_invert_then_reconstruct(tmp_path, capsys):
    sc = scenes.sample(4242, n_objects=1)
    img = tmp_path / "scene.png"
    sc.image.save(img)
    inv_path = tmp_path / "scene.safetensors"
    rc = main(["invert", str(img), "--prompt", sc.caption, "--method", "direct", "--steps", "8",
               "--model", "shapes", "--device", "cpu", "-o", str(inv_path)])
    assert rc == 0 and inv_path.is_file()
    inv = Inversion.load(inv_path)
    assert inv.method == "direct" and inv.steps == 8 and inv.prompt == sc.caption
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(inv_path), "--model", "shapes", "--device", "cpu",
                 "-o", str(out)]) == 0
    assert psnr(Image.open(out).convert("RGB"), sc.image) > 30


def test_invert_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    rc = main(["invert", str(bad), "--prompt", "a red circle", "--model", "shapes",
               "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a readable image" in err[0]
    rc = main(["reconstruct", str(bad), "--model", "shapes", "-o", str(tmp_path / "y.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "not a pivot-edit inversion" in err[-1]
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    rc = main(["invert", str(good), "--prompt", "a red circle", "--model", "shapes",
               "-o", str(tmp_path / "x.pt")])
    assert rc == 2 and "must end in .safetensors" in capsys.readouterr().err
