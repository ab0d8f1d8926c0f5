"""The Ray engine (``--engine ray``): same outputs as the local engine, worker and driver kills.

The Ray tests run on a local instance (``ray.init(num_cpus=2)``) with the bundled model,
DDIM inversion with 2 steps, torch at one thread in the workers and (for the comparison)
in this process: CPU results depend on the thread count. One end-to-end test is in the
default run; the kill tests and the comparison are ``slow``. The command-line checks at
the top need no Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from editor import scenes
from editor.batch import is_complete_image, read_manifest, run_batch
from editor.cli import main as cli_main
from editor.options import EngineOptions, LoadOptions

DEFAULTS = {"method": "ddim", "steps": 2}
ROOT = Path(__file__).resolve().parents[1]


# -- the command line, without Ray ---------------------------------------------------------------


def _manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _one_item(folder: Path) -> Path:
    scenes.sample(1, n_objects=1).image.save(folder / "a.png")
    return _manifest(folder, [{"id": "a", "image": "a.png", "prompt": "a red circle",
                               "edits": ["a blue circle"]}])


def test_engine_ray_without_ray_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    m = _one_item(tmp_path)
    for argv in (["batch", str(m)], ["compare", "--manifest", str(m)]):
        assert cli_main([*argv, "--out", str(tmp_path / "o"), "--engine", "ray"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and 'pip install "pivot-edit[ray]"' in err, err
    assert not (tmp_path / "o").exists()


def test_engine_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("editor.cli.load_editor", lambda args: pytest.fail("model loaded"))
    m = _one_item(tmp_path)
    out = str(tmp_path / "o")
    assert cli_main(["batch", str(m), "--out", out, "--workers", "2"]) == 2
    assert "--workers needs --engine ray" in capsys.readouterr().err
    assert cli_main(["batch", str(m), "--out", out, "--engine", "ray", "--retries", "-1"]) == 2
    assert "retries must be an integer in 0..100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="address must be"):
        EngineOptions(engine="ray", address="not an address")
    pytest.importorskip("ray", reason="the relative --out check runs after Ray is found")
    assert cli_main(["batch", str(m), "--out", "rel/out", "--engine", "ray",
                     "--address", "10.0.0.7:6379"]) == 2
    assert "is relative" in capsys.readouterr().err
    assert not Path("rel").exists()


# -- Ray on a local instance -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray: pip install '.[ray]'")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def _scene_manifest(folder: Path, n: int, *, broken: bool, twin: bool) -> Path:
    """``n`` scene items (the first with two edits sharing one batched run); ``twin``: the
    second item is the first's image and prompt again (one cache key, two ids); ``broken``:
    a last item whose image is not an image."""
    rows = []
    for i in range(n):
        s = scenes.sample(300 + i, n_objects=1, colors=("red",), background="white")
        s.image.save(folder / f"s{i}.png")
        shape = s.scene.objects[0].shape
        edits = [f"a blue {shape} on a white background"]
        if i == 0:
            edits.append(f"a green {shape} on a white background")
        rows.append({"id": f"s{i}", "image": f"s{i}.png", "prompt": s.caption, "edits": edits})
    if twin:
        rows[1] = {**rows[0], "id": "twin", "edits": rows[0]["edits"][:1]}
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
        rows.append({"id": "broken", "image": "broken.png", "prompt": "a red circle",
                     "edits": ["a blue circle"]})
    return _manifest(folder, rows)


def _files(out: Path) -> dict[str, bytes]:
    """Every output file by path, but the summary, the lock and the cache."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("summary.json", ".pivot-edit.lock")
            and ".cache" not in p.parts}


def _comparable(summary: dict) -> list[dict]:
    drop = ("seconds", "inversion_cached")
    return [{k: v for k, v in r.items() if k not in drop} for r in summary["items"]]


def test_ray_outputs_equal_local_outputs_and_workers_share_the_cache(ray_local, editor, tmp_path):
    """A 6-item manifest (one broken item, two items on one cache key) through the local
    engine and through 2 Ray workers: the same files bit for bit, the same records."""
    from editor.ray_engine import ModelSpec, run_batch_ray

    m = _scene_manifest(tmp_path, 5, broken=True, twin=True)
    items = read_manifest(m)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_batch(editor, items, tmp_path / "local", defaults=DEFAULTS, progress=False)
    finally:
        torch.set_num_threads(threads)
    report = run_batch_ray(ModelSpec(LoadOptions(model="shapes", device="cpu"), threads=1), items,
                           tmp_path / "ray", engine=EngineOptions(engine="ray", workers=2),
                           defaults=DEFAULTS, progress=False, manifest=str(m))
    assert local.exit_status == report.exit_status == 1
    assert [r.id for r in report.failed] == ["broken"]
    a, b = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 5 * 2 + 1  # edits + reconstructions
    assert [k for k in a if a[k] != b[k]] == []
    first = items[0].output_names()[0]
    assert a[f"s0/{first}"] == a[f"twin/{first}"]
    sl = json.loads((tmp_path / "local/summary.json").read_text())
    sr = json.loads((tmp_path / "ray/summary.json").read_text())
    assert _comparable(sl) == _comparable(sr)
    assert sr["finished"] and sr["engine"] == "ray" and sl["engine"] == "local"
    workers = sr["workers"]
    assert len(workers) == 2 and sum(w["items"] for w in workers) == 6
    assert all(w["items_per_s"] and w["seconds"] > 0 and w["restarts"] == 0 for w in workers)
    # two items on one key: one complete cache entry per distinct image, no temporaries
    cache = sorted(p.name for p in (tmp_path / "ray/.cache").iterdir())
    assert cache == sorted(p.name for p in (tmp_path / "local/.cache").iterdir())
    assert len(cache) == 4 and all(n.endswith(".safetensors") for n in cache)
    # a rerun has nothing to do: no Ray worker is started
    again = run_batch_ray(ModelSpec(LoadOptions(model="nonexistent-model")), items[:-1], tmp_path / "ray",
                          engine=EngineOptions(engine="ray"), defaults=DEFAULTS, progress=False)
    assert again.exit_status == 0 and all(r.resumed for r in again.records)


@pytest.mark.slow
def test_two_workers_invert_one_key_at_once(ray_local, tmp_path):
    """Two items with one cache key start together on two workers (an inversion slow
    enough that both miss the cache): both write the entry, one complete file remains."""
    from editor.inversion import Inversion
    from editor.ray_engine import ModelSpec, run_batch_ray

    s = scenes.sample(7, n_objects=1, colors=("red",), background="white")
    s.image.save(tmp_path / "a.png")
    row = {"image": "a.png", "prompt": s.caption, "edits": [s.caption.replace("red", "blue")],
           "inversion": {"method": "ddim", "steps": 12}}
    items = read_manifest(_manifest(tmp_path, [{**row, "id": "one"}, {**row, "id": "two"}]))
    out = tmp_path / "out"
    report = run_batch_ray(ModelSpec(LoadOptions(model="shapes", device="cpu"), threads=1), items, out,
                           engine=EngineOptions(engine="ray", workers=2), progress=False)
    assert report.exit_status == 0
    assert [r.inversion_cached for r in report.records] == [False, False]  # they overlapped
    entries = list((out / ".cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"
    Inversion.load(entries[0])  # complete and valid
    name = items[0].output_names()[0]
    assert (out / "one" / name).read_bytes() == (out / "two" / name).read_bytes()


@pytest.mark.slow
def test_compare_ray_equals_local(ray_local, editor, tmp_path):
    """ShapesBench (3 cases) x 3 configurations in 2 inversion groups: the same raw images
    and metrics (timing columns aside) through the local engine and 2 Ray workers."""
    import csv

    from editor import compare as C
    from editor.ray_engine import ModelSpec, WorkerPool, run_compare_ray

    cases = C.shapes_bench(1, seed=0, size=editor.native_size)
    configs = C.default_configs(["ddim", "direct"], invert={"steps": 2})
    configs.append(C.Config("ddim-06", "ddim", {"steps": 2}, {"cross_replace": 0.6}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        C.run_compare(editor, cases, configs, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    with WorkerPool(ModelSpec(LoadOptions(model="shapes", device="cpu"), threads=1),
                    EngineOptions(engine="ray", workers=2)) as pool:
        assert pool.first_info()["native_size"] == editor.native_size
        rep = run_compare_ray(pool, cases, configs, tmp_path / "ray", progress=False)
    assert all(r.status == "ok" for r in rep.rows)
    a = {k: v for k, v in _files(tmp_path / "local").items() if k.startswith("raw/")}
    b = {k: v for k, v in _files(tmp_path / "ray").items() if k.startswith("raw/")}
    assert sorted(a) == sorted(b) and len(a) == 3 * 3 * 2 and a == b

    def metrics(folder: Path) -> list[dict]:
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert metrics(tmp_path / "local") == metrics(tmp_path / "ray")
    assert "Ray engine: 2 inversion group(s) on 2 worker(s)" in (tmp_path / "ray/summary.md").read_text()


# -- kills (a real `pivot-edit batch --engine ray` process) ----------------------------------------


def _children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _batch_cmd(m: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "editor", "batch", str(m), "--out", str(out), "--model", "shapes",
            "--device", "cpu", "--method", "ddim", "--steps", "2", "--engine", "ray",
            "--workers", "2", "--threads", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        assert proc.poll() is None, "the batch ended before the kill; use more items"
        time.sleep(0.05)
    assert cond(), "timed out"


def _kill_tree(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_worker_is_restarted_and_the_batch_completes(tmp_path):
    pytest.importorskip("ray", reason="the Ray engine needs ray")
    m = _scene_manifest(tmp_path, 6, broken=False, twin=False)
    out = tmp_path / "out"
    proc = subprocess.Popen(_batch_cmd(m, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    tree: list[int] = []
    try:
        def busy_workers() -> list[int]:
            return [p for p in _children(proc.pid) if "ray::Worker.batch_item" in _cmdline(p)]

        _wait_for(lambda: bool(busy_workers()), proc)
        victim = busy_workers()[0]
        os.kill(victim, signal.SIGKILL)
        tree = _children(proc.pid)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            tree = tree + _children(proc.pid)
            proc.kill()
        _kill_tree(tree)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [r["status"] for r in summary["items"]] == ["ok"] * 6
    assert sum(w["restarts"] for w in summary["workers"]) == 1
    for r in summary["items"]:
        for rel in r["outputs"] + [r["reconstruction"]]:
            assert is_complete_image(out / rel), rel
    assert not list(out.rglob("*.tmp"))


def _item_dirs(out: Path) -> list[Path]:
    return [d for d in out.glob("s*") if d.is_dir() and d.name[1:].isdigit()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_driver_then_rerun_resumes_without_redoing(tmp_path):
    pytest.importorskip("ray", reason="the Ray engine needs ray")
    m = _scene_manifest(tmp_path, 6, broken=False, twin=False)
    out = tmp_path / "out"
    cmd = _batch_cmd(m, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    tree: list[int] = []
    try:
        def some_item_done() -> bool:
            return any(is_complete_image(d / "reconstruction.png") for d in _item_dirs(out))

        _wait_for(some_item_done, proc)
        tree = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 60  # Ray's processes follow their driver
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_tree(tree)
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")
            if is_complete_image(p)}
    complete = {d.name for d in _item_dirs(out) if all(
        is_complete_image(d / n) for n in ["reconstruction.png"]
        + read_manifest(m)[int(d.name[1:])].output_names())}
    assert done and len(complete) < 6, "killed part-way"
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [r["status"] for r in summary["items"]] == ["ok"] * 6
    assert {r["id"] for r in summary["items"] if r["resumed"]} == complete
    for p, stamp in done.items():  # nothing finished before the kill was written again
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, p
    assert sum(w["items"] for w in summary["workers"]) == 6 - len(complete)


def test_bench_batch_local_prints_items_per_second(editor, capsys, monkeypatch):
    """``pivot-edit bench batch`` (local engine, the session's model): JSON with items/s and
    the machine named."""
    monkeypatch.setattr("editor.facade.Editor.load", lambda *a, **k: editor)
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "batch", "--items", "2", "--steps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(capsys.readouterr().out)
    assert res["engine"] == "local" and res["items"] == 2 and res["failed"] == []
    assert res["items_per_s"] > 0 and res["machine"]["cpu_count"] >= 1
    assert [w["items"] for w in res["workers"]] == [2]
