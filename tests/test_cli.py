"""The ``pivot-edit`` command line (editor/cli.py), run in-process through ``main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from editor import cli
from editor import loading as model_mod
from editor.cli import build_parser, main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("generate", "ui", "bench"):
        assert name in out


@pytest.mark.parametrize("argv", [["generate", "--help"], ["ui", "--help"], ["bench", "--help"],
                                  ["bench", "model", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: pivot-edit" in capsys.readouterr().out


def test_generate_writes_an_image_of_native_size(tmp_path, capsys, monkeypatch):
    """--model auto with no SD 1.5 cached and no hub: the bundled model, with a notice."""
    monkeypatch.setattr(model_mod, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(model_mod, "_hub_reachable", lambda timeout=3.0: False)
    out = tmp_path / "red.png"
    rc = main(["generate", "a red circle on a white background", "-o", str(out),
               "--model", "auto", "--device", "cpu", "--steps", "4", "--seed", "3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert captured.err.startswith("notice:") and "bundled" in captured.err
    img = Image.open(out)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["red.png"]  # no temporary left behind


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "shapes", "--device", "cpu", "--dtype", "float16"], "float16"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, words, tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = main(["generate", "a red circle on a white background", "-o", str(out), *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pivot-edit: error: ") and words in err[0]
    assert not out.exists()


def test_bad_output_suffix_fails_before_loading(tmp_path, capsys):
    rc = main(["generate", "a red circle", "-o", str(tmp_path / "x.txt"), "--model", "shapes"])
    assert rc == 2
    assert ".png" in capsys.readouterr().err


def test_bench_model_prints_json(capsys):
    rc = main(["bench", "model", "--model", "shapes", "--device", "cpu", "--steps", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model_id"] == "shapes" and res["steps"] == 2
    assert len(res["fingerprint"]) == 16
    assert res["load_seconds"] > 0 and res["generate_seconds"] > 0
    assert res["machine"]["torch"] and res["machine"]["cpu_count"] >= 1


def test_generate_defaults_to_auto_model():
    args = build_parser().parse_args(["generate", "p", "-o", "o.png"])
    assert args.model == "auto" and args.steps == 50 and args.guidance == 7.5


def test_python_dash_m_editor_runs(tmp_path):
    """``python -m editor`` is the same program (run outside the repo: the installed package)."""
    res = subprocess.run([sys.executable, "-m", "editor", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "generate" in res.stdout


def test_threads_default_to_the_free_cores_and_can_be_set(monkeypatch):
    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert cli.free_cores() == 1  # two cores, one busy: one thread, not two fighting
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert cli.free_cores() == 1  # never fewer than one
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.free_cores() == 2
    before = torch.get_num_threads()
    try:
        assert cli.configure_threads(3) == 3 and torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="--threads must be an integer >= 1"):
            cli.configure_threads(0)
        args = build_parser().parse_args(["generate", "p", "-o", "o.png", "--threads", "2"])
        assert args.threads == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, dest", [
    (["invert", "x.png", "--prompt", "a cat", "-o", "x.safetensors"], "inner_steps"),
    (["batch", "m.jsonl", "--out", "o"], "num_inner_steps"),
    (["compare", "--bench", "shapes", "--out", "o"], "num_inner_steps"),
])
def test_inner_steps_has_one_name_everywhere(argv, dest):
    """``--inner-steps`` (and the older ``--num-inner-steps``) on every verb that inverts."""
    for flag in ("--inner-steps", "--num-inner-steps"):
        args = build_parser().parse_args([*argv, flag, "3"])
        assert getattr(args, dest) == 3


def test_auto_does_not_download_sd15_for_another_models_inversion(monkeypatch):
    """``edit``/``reconstruct`` with ``--model auto`` and an inversion made with the bundled
    model: when auto would download SD 1.5, the error comes first and names the fix."""
    from types import SimpleNamespace

    from editor import cli, loading

    monkeypatch.setattr(loading, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: True)
    args = SimpleNamespace(model="auto", model_from_inversion=False, threads=1)
    inv = SimpleNamespace(model_id="shapes")
    with pytest.raises(ValueError, match="--model shapes or --model-from-inversion"):
        cli.load_editor(args, inv)
    # offline, auto is the bundled model: nothing to warn about
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    cli.check_auto_for_inversion(inv)
    # an SD 1.5 inversion: auto is the right model
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: True)
    cli.check_auto_for_inversion(SimpleNamespace(model_id=loading.SD15))
    cli.check_auto_for_inversion(SimpleNamespace(model_id="auto"))  # made with auto itself
