"""Batch runs: manifest formats, caching, summary, failure isolation, resume (also after kill -9).

The orchestration tests use a stub engine (``FakeEditor``) so that they are fast
and can count calls; ``test_batch_cli_real_engine`` and the kill -9 test run
the real engine on the bundled model (DDIM inversion, few steps) end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editor import batch, metrics, scenes
from editor.batch import ManifestError, read_manifest, run_batch
from editor.cli import main as cli_main
from editor.images import image_hash
from editor.inversion import Inversion

# -- a stub engine with the Editor's verbs ------------------------------------------------------


@dataclass
class FakeResult:
    image: Image.Image


def given(options) -> tuple:
    """The options' fields that differ from their defaults, sorted (what a caller set)."""
    default = type(options)().to_dict()
    return tuple(sorted((k, v) for k, v in options.to_dict().items() if v != default[k]))


class FakeEditor:
    """Same verbs as ``Editor``; images are solid colours derived from the target text."""

    model_id = "fake"
    fingerprint = "f" * 16
    arch = "sd"

    def __init__(self):
        self.calls: list[tuple] = []

    def invert(self, image, prompt, options, progress=True):
        if "unreadable" in prompt:
            raise ValueError("prompt is too long: 99 tokens")
        self.calls.append(("invert", prompt, given(options)))
        n = options.steps  # a consistent file: it is validated when read back from the cache
        return Inversion(prompt=prompt, method=options.method, steps=n, guidance=7.5,
                         z_T=torch.zeros(1, 4, 2, 2),
                         uncond=torch.zeros(n if options.method == "null-text" else 1, 3, 2),
                         timesteps=list(range(n, 0, -1)), image_size=image.size,
                         model_id=self.model_id, model_fingerprint=self.fingerprint,
                         image_hash=image_hash(image),
                         offsets=torch.zeros(n, 1, 4, 2, 2) if options.method == "direct" else None)

    def reconstruct(self, inv):
        self.calls.append(("reconstruct", inv.prompt))
        return Image.new("RGB", inv.image_size, (1, 2, 3))

    def _img(self, target):
        if "REFUSE" in target:
            raise ValueError(f"target {target!r} refused")
        rgb = tuple(hashlib.sha256(target.encode()).digest()[:3])
        return Image.new("RGB", (8, 8), rgb)

    def edit(self, inv, target, options, mask=None, original=None):
        self.calls.append(("edit", target, given(options)))
        return FakeResult(self._img(target))

    def edit_many(self, inv, targets, options, mask=None, original=None):
        self.calls.append(("edit_many", tuple(targets), given(options)))
        return [FakeResult(self._img(t)) for t in targets]

    def count(self, verb):
        return sum(c[0] == verb for c in self.calls)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _dead_writer_temporary(path: Path) -> Path:
    """The temporary a writer that has since died would have left for ``path``."""
    from editor import fileio

    return fileio.temporary_path(path).with_name(
        fileio.temporary_path(path).name.replace(f"-{os.getpid()}.", f"-{_dead_pid()}."))


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        scenes.sample(i, n_objects=1).image.save(d / name)
    (d / "corrupt.png").write_bytes(b"not a png at all")
    return d


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- manifests ---------------------------------------------------------------------------------


def test_three_formats_give_the_same_items(images):
    jl = _write(images / "m.jsonl", "\n".join([
        json.dumps({"id": "one", "image": "a.png", "prompt": "a red  circle",
                    "edits": ["a blue circle", {"target": "a green circle", "cross_replace": 0.5}],
                    "inversion": {"method": "ddim", "steps": 5}}),
        "",
        json.dumps({"image": str(images / "b.png"), "prompt": "x", "target": "y", "steps": 3}),
    ]))
    ym = _write(images / "m.yaml", """
items:
  - id: one
    image: a.png
    prompt: a red  circle
    edits:
      - a blue circle
      - {target: a green circle, cross_replace: 0.5}
    inversion: {method: ddim, steps: 5}
  - image: {b}
    prompt: x
    edits: [y]
    steps: 3
""".replace("{b}", str(images / "b.png")))
    cs = _write(images / "m.csv", "id,image,prompt,target,cross_replace,method,steps\n"
                "one,a.png,a red  circle,a blue circle,,ddim,5\n"
                "one,a.png,a red  circle,a green circle,0.5,ddim,5\n"
                f",{images / 'b.png'},x,y,,,3\n")
    parsed = [read_manifest(p) for p in (jl, ym, cs)]
    for items in parsed:
        assert [it.id for it in items] == ["one", "b"]
        one, two = items
        assert one.image == images / "a.png" and one.prompt == "a red circle"
        assert [(e.target, e.options) for e in one.edits] == [
            ("a blue circle", {}), ("a green circle", {"cross_replace": 0.5})]
        assert one.inversion == {"method": "ddim", "steps": 5}
        assert two.inversion == {"steps": 3} and [e.target for e in two.edits] == ["y"]
    assert parsed[0][1].line == 3 and parsed[1][0].line == 3
    assert parsed[0][0].output_names() == ["1-a-blue-circle.png", "2-a-green-circle.png"]


@pytest.mark.parametrize("name,text,line,reason", [
    ("bad.jsonl", '{"image": "a.png", "prompt": "p", "edits": ["t"]}\n{"image": \n', 2, "not valid JSON"),
    ("bad.jsonl", '{"image": "a.png", "edits": ["t"]}\n', 1, "missing 'prompt'"),
    ("bad.jsonl", '{"image": "a.png", "prompt": "p", "edits": []}\n', 1, "non-empty list"),
    ("bad.jsonl", '{"image": "a.png", "prompt": "p", "edits": ["t"], "colour": 1}\n', 1, "unknown key"),
    ("bad.jsonl", '{"image": "a.png", "prompt": "p", "edits": ["t"], "method": "magic"}\n', 1,
     "unknown inversion method"),
    ("bad.jsonl", '{"image": "a.png", "prompt": "p", "edits": ["t"], "steps": "ten"}\n', 1, "bad value"),
    ("bad.jsonl", '{"id": "../x", "image": "a.png", "prompt": "p", "edits": ["t"]}\n', 1, "id"),
    ("bad.jsonl", '{"id": "x", "image": "a.png", "prompt": "p", "edits": ["t"]}\n'
                  '{"id": "x", "image": "b.png", "prompt": "p", "edits": ["t"]}\n', 2, "duplicate id"),
    ("bad.yaml", "- image: a.png\n  prompt: p\n  edits: [t\n", 4, "not valid YAML"),
    ("bad.yaml", "- image: a.png\n  prompt: p\n  edits: [t]\n- image: b.png\n  edits: [t]\n", 4,
     "missing 'prompt'"),
    ("bad.csv", "image,prompt\na.png,p\n", 1, "lacks column"),
    ("bad.csv", "image,prompt,target\na.png,p,t\nb.png,p\n", 3, "non-empty 'target'"),
    ("bad.txt", "whatever", None, "unknown manifest type"),
])
def test_unreadable_manifests_name_line_and_reason(tmp_path, name, text, line, reason):
    p = _write(tmp_path / name, text)
    with pytest.raises(ManifestError, match=reason) as err:
        read_manifest(p)
    assert err.value.line == line
    assert (f"{p}:{line}" if line else str(p)) in str(err.value)


def test_duplicate_image_stems_get_unique_ids(images):
    p = _write(images / "m.jsonl", "\n".join(
        json.dumps({"image": "a.png", "prompt": f"p{i}", "edits": ["t"]}) for i in range(3)))
    assert [it.id for it in read_manifest(p)] == ["a", "a-2", "a-3"]


def test_cache_key_ignores_spelling_of_defaults():
    key = batch.cache_key
    assert key("h", "a  b", "m", {}) == key("h", "a b", "m", {"method": "null-text", "steps": 50})
    assert key("h", "p", "m", {"method": "ddim", "num_inner_steps": 3}) == key("h", "p", "m", {"method": "ddim"})
    assert key("h", "p", "m", {"guidance": 7}) == key("h", "p", "m", {"guidance": 7.5 - 0.5})
    assert key("h", "p", "m", {}) != key("h", "p", "m", {"num_inner_steps": 3})
    assert key("h", "p", "m", {}) != key("h", "p", "other", {})
    assert key("h", "p", "m", {}) != key("h2", "p", "m", {})


# -- running with the stub engine --------------------------------------------------------------


def _manifest(images: Path) -> Path:
    rows = [
        {"id": "a", "image": "a.png", "prompt": "a red circle",
         "edits": ["a blue circle", "a green circle", {"target": "a red square", "cross_replace": 0.3}],
         "method": "ddim"},
        {"id": "missing", "image": "nope.png", "prompt": "p", "edits": ["t"]},
        {"id": "corrupt", "image": "corrupt.png", "prompt": "p", "edits": ["t"]},
        {"id": "refused", "image": "b.png", "prompt": "a red circle",
         "edits": ["a blue circle", "REFUSE this", "a yellow circle"]},
        {"id": "badprompt", "image": "c.png", "prompt": "unreadable prompt", "edits": ["t"]},
    ]
    return _write(images / "m.jsonl", "\n".join(json.dumps(r) for r in rows))


def test_batch_runs_isolates_failures_and_caches(images, tmp_path):
    out = tmp_path / "out"
    fake = FakeEditor()
    items = read_manifest(_manifest(images))
    report = run_batch(fake, items, out, defaults={"steps": 7, "method": "null-text"}, progress=False)
    assert report.exit_status == 1
    summary = json.loads((out / "summary.json").read_text())
    recs = {r["id"]: r for r in summary["items"]}
    assert list(recs) == ["a", "missing", "corrupt", "refused", "badprompt"]
    assert recs["a"]["status"] == "ok" and recs["a"]["error"] is None
    assert recs["a"]["outputs"] == ["a/1-a-blue-circle.png", "a/2-a-green-circle.png", "a/3-a-red-square.png"]
    for rel in recs["a"]["outputs"] + [recs["a"]["reconstruction"]]:
        assert batch.is_complete_image(out / rel)
    assert "not found" in recs["missing"]["error"] and recs["missing"]["status"] == "failed"
    assert "not a readable image" in recs["corrupt"]["error"]
    assert "too long" in recs["badprompt"]["error"]
    # one refused edit fails the item, its siblings are still written
    assert recs["refused"]["status"] == "failed" and "REFUSE" in recs["refused"]["error"]
    assert (out / "refused/1-a-blue-circle.png").is_file() and (out / "refused/3-a-yellow-circle.png").is_file()
    assert not (out / "refused/2-refuse-this.png").exists()
    # item options beat the run's defaults; shared options -> one edit_many call
    inv_calls = [c for c in fake.calls if c[0] == "invert"]
    assert inv_calls[0] == ("invert", "a red circle", (("method", "ddim"), ("steps", 7)))
    assert ("edit_many", ("a blue circle", "a green circle"), ()) in fake.calls
    assert ("edit", "a red square", (("cross_replace", 0.3),)) in fake.calls
    assert summary["finished"] is True and all(r["seconds"] >= 0 for r in summary["items"])

    # rerun: done items are skipped; failed ones retried; the inversion comes from the cache
    (out / "a/2-a-green-circle.png").unlink()
    leftover = _dead_writer_temporary(out / "a/1-a-blue-circle.png")  # a killed run's leftover
    leftover.write_bytes(b"half")
    fake2 = FakeEditor()
    report = run_batch(fake2, items, out, defaults={"steps": 7, "method": "null-text"}, progress=False)
    recs = {r.id: r for r in report.records}
    assert recs["a"].status == "ok" and recs["a"].inversion_cached is True
    assert [c for c in fake2.calls if c[0] != "invert" and c[1] != "a blue circle"][0][:2] == (
        "edit", "a green circle")
    assert not any(c[0] == "invert" and c[1] == "a red circle" and c[2][0] == ("method", "ddim")
                   for c in fake2.calls)
    assert not list((out / "a").glob("*.tmp"))
    # different inversion options -> a new cache entry, not a stale one
    fake3 = FakeEditor()
    (out / "a/1-a-blue-circle.png").unlink()
    run_batch(fake3, items[:1], out, defaults={"steps": 9}, progress=False)
    assert fake3.count("invert") == 1


def test_complete_run_needs_no_model(images, tmp_path):
    out = tmp_path / "out"
    items = read_manifest(_manifest(images))[:1]
    run_batch(FakeEditor(), items, out, progress=False)
    first = json.loads((out / "summary.json").read_text())["items"][0]

    def factory():
        raise AssertionError("the model must not load when everything is done")

    report = run_batch(factory, items, out, progress=False)
    assert report.exit_status == 0 and report.records[0].resumed
    assert report.records[0].seconds == first["seconds"]


def test_damaged_output_and_cache_are_redone(images, tmp_path):
    out = tmp_path / "out"
    items = read_manifest(_manifest(images))[:1]
    run_batch(FakeEditor(), items, out, progress=False)
    (out / "a/1-a-blue-circle.png").write_bytes(b"\x89PNG truncated")
    for f in (out / ".cache").iterdir():
        f.write_bytes(b"garbage")
    fake = FakeEditor()
    assert run_batch(fake, items, out, progress=False).exit_status == 0
    assert fake.count("invert") == 1 and batch.is_complete_image(out / "a/1-a-blue-circle.png")


def test_plan_lists_work_without_a_model(images, tmp_path):
    items = read_manifest(_manifest(images))
    lines = batch.plan(items, tmp_path / "out")
    text = "\n".join(lines)
    assert "missing:" in text and "image not found" in text
    assert "3. a red square {\"cross_replace\": 0.3}" in text
    assert lines[-1].startswith("5 item(s), 9 edit(s), 9 to do")


def test_cli_dry_run_and_exit_codes(images, tmp_path, capsys):
    m = _manifest(images)
    assert cli_main(["batch", str(m), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "9 to do" in capsys.readouterr().out
    assert not (tmp_path / "o" / "summary.json").exists()
    bad = _write(images / "bad.jsonl", '{"image": "a.png"}\n')
    assert cli_main(["batch", str(bad), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pivot-edit: error: manifest") and "bad.jsonl:1" in err


def test_cli_exit_status_1_when_an_item_fails(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("editor.cli.load_editor", lambda args: FakeEditor())
    out = tmp_path / "o"
    assert cli_main(["batch", str(_manifest(images)), "--out", str(out)]) == 1
    io = capsys.readouterr()
    assert "item missing failed" in io.err and "1/5 item(s) ok" in io.out
    ok = _write(images / "ok.jsonl", json.dumps({"image": "a.png", "prompt": "p", "edits": ["t"]}))
    assert cli_main(["batch", str(ok), "--out", str(tmp_path / "o2")]) == 0


# -- the real engine -----------------------------------------------------------------------------


def _real_manifest(d: Path, n_items: int) -> Path:
    rows = []
    for i in range(n_items):
        s = scenes.sample(100 + i, n_objects=1, colors=("red",), background="white")
        s.image.save(d / f"s{i}.png")
        shape = s.scene.objects[0].shape
        rows.append({"id": f"s{i}", "image": f"s{i}.png", "prompt": s.caption,
                     "edits": [f"a blue {shape} on a white background",
                               f"a green {shape} on a white background"]})
    return _write(d / "real.jsonl", "\n".join(json.dumps(r) for r in rows))


def test_batch_real_engine(editor, tmp_path):
    """The real engine on the bundled model: DDIM inversion, 4 steps, two edits sharing it."""
    m = _real_manifest(tmp_path, 1)
    out = tmp_path / "out"
    items = read_manifest(m)
    report = run_batch(editor, items, out, defaults={"method": "ddim", "steps": 4}, progress=False)
    assert report.exit_status == 0, report.records[0].error
    rec = json.loads((out / "summary.json").read_text())["items"][0]
    assert rec["status"] == "ok" and rec["inversion_cached"] is False
    pics = [np.asarray(Image.open(out / rel)) for rel in rec["outputs"] + [rec["reconstruction"]]]
    assert all(p.shape == (64, 64, 3) for p in pics)
    blue, green, recon = (p.astype(float) for p in pics)
    assert np.abs(blue - green).mean() > 1  # two different edits
    assert metrics.psnr(recon.astype(np.uint8), np.asarray(Image.open(items[0].image))) > 20
    # a second run over the same image reuses the cached inversion
    for p in (out / "s0").glob("*.png"):
        p.unlink()
    report = run_batch(editor, items, out, defaults={"method": "ddim", "steps": 4}, progress=False)
    assert report.records[0].inversion_cached is True and report.exit_status == 0
    assert len(list((out / ".cache").glob("*.safetensors"))) == 1


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    """A real ``pivot-edit batch`` process is SIGKILLed after its first output appears;
    the rerun completes everything and no temporary file is taken for an output."""
    pytest.importorskip("editor.editing")
    m = _real_manifest(tmp_path, 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "editor", "batch", str(m), "--out", str(out), "--model", "shapes",
           "--method", "ddim", "--steps", "4"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("s0/*.png")):
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the batch finished before it could be killed; use more items"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = sorted(p.name for p in out.rglob("*.png"))
    assert first and len(first) < 9  # killed part-way: 3 items x (2 edits + reconstruction)
    # plant what a kill in the middle of a write leaves behind
    (out / "s1").mkdir(exist_ok=True)
    _dead_writer_temporary(out / "s1/1-a-blue-square-on-a-white-background.png").write_bytes(
        b"\x89PNG half")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [r["status"] for r in summary["items"]] == ["ok"] * 3
    for r in summary["items"]:
        for rel in r["outputs"] + [r["reconstruction"]]:
            assert batch.is_complete_image(out / rel), rel
    assert not list(out.rglob("*.tmp"))


# -- options are validated when the manifest is read (before any model loads) ---------------------


@pytest.mark.parametrize("row, reason", [
    ({"edits": [{"target": "t", "cross_replce": 0.5}]}, "unknown edit option 'cross_replce'"),
    ({"edits": ["t"], "inversion": {"inner": 3}}, "unknown inversion option 'inner'"),
    ({"edits": ["t"], "steps": -1}, "steps must be an integer in 1..1000, got -1"),
    ({"edits": ["t"], "inversion": {"guidance": float("nan")}}, "guidance must be a finite number"),
    ({"edits": [{"target": "t", "cross_replace": 1.5}]}, "cross_replace must lie in [0, 1]"),
    ({"edits": [{"target": "t", "guidance": float("inf")}]}, "guidance must be a finite number"),
    ({"edits": [{"target": "t", "reweight": {"red": 1e30}}]}, "reweight factor for 'red'"),
    ({"edits": ["t"], "num_inner_steps": 2.5}, "num_inner_steps must be an integer"),
])
def test_dry_run_refuses_bad_options_before_loading_a_model(images, tmp_path, capsys,
                                                            monkeypatch, row, reason):
    def no_model(args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("editor.cli.load_editor", no_model)
    good = json.dumps({"image": "a.png", "prompt": "p", "edits": ["t"]})
    bad = json.dumps({"image": "b.png", "prompt": "p", **row})  # json writes NaN / Infinity
    m = _write(images / "m.jsonl", good + "\n" + bad + "\n")
    assert cli_main(["batch", str(m), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{m}:2: " in err and reason in err, err
    assert cli_main(["batch", str(m), "--out", str(tmp_path / "o")]) == 2  # the real run too
    assert not (tmp_path / "o").exists()


def test_bad_command_line_defaults_fail_before_loading(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("editor.cli.load_editor", lambda args: pytest.fail("model loaded"))
    m = _write(images / "m.jsonl", json.dumps({"image": "a.png", "prompt": "p", "edits": ["t"]}))
    assert cli_main(["batch", str(m), "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps must be an integer in 1..1000" in capsys.readouterr().err
