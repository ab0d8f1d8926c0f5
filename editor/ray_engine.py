"""The Ray engine of ``pivot-edit batch`` and ``compare`` (``--engine ray``).

Each worker is a Ray actor that loads the model once (``Editor.from_pretrained`` with the
run's model, device and dtype) and then runs whole units of work: a batch item (invert
once, every edit, the reconstruction) through :func:`editor.batch.run_item`, or a
comparison's inversion group through :func:`editor.compare.run_group`, the same code the
local engine runs. The workers write the outputs into ``--out`` (atomic writes, the
shared inversion cache ``--out/.cache``); the driver hands out the units (one in flight
per worker), collects the records, keeps the summary with :class:`editor.batch.BatchRun`
(or writes the comparison's tables with :func:`editor.compare.finish_compare`) and holds
the output folder's lock.

A worker that dies (killed, out of memory) is restarted by Ray (``max_restarts=-1``) and
the unit it was running is run again, up to ``--retries`` times; then it is recorded as
failed with the reason and the run goes on. Ray is imported here only, and only when the
engine is asked for: it is an optional extra (``pip install "pivot-edit[ray]"``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from . import compare as C
from .batch import (
    BatchReport,
    BatchRun,
    ItemRecord,
    _LazyEditor,
    failed_record,
    item_done,
    resumed_record,
    run_item,
)
from .fileio import OutputLock, check_output_folder, slugify
from .manifest import BatchItem
from .options import EngineOptions, LoadOptions
from .progress import quiet_libraries

#: How to get the engine (the one line a run without Ray prints).
RAY_EXTRA = 'pip install "pivot-edit[ray]"'
#: How long the driver waits for a first worker to load its model before giving up.
START_TIMEOUT_S = 900.0


def import_ray() -> Any:
    """The ``ray`` module, or a one-line ``ValueError`` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads, ``Editor.load(load)``, and with how many torch CPU
    ``threads`` (``None``: the worker's share of the CPUs). CPU results depend on the
    thread count: give the local engine the same ``--threads`` to get the same bits."""

    load: LoadOptions
    threads: int | None = None


class _NoBar:
    """A progress bar that shows nothing (the driver's bar is the one a person sees)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


def _quiet_worker() -> None:
    quiet_libraries()
    os.environ["TQDM_DISABLE"] = "1"


class Worker:
    """A Ray actor's body (made remote by :class:`WorkerPool`): the model, loaded once."""

    def __init__(self, spec: ModelSpec, index: int) -> None:
        import torch

        _quiet_worker()
        self.spec, self.index = spec, index
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.lazy = _LazyEditor(self._load)
        self.load_error: str | None = None
        try:
            self.lazy.get()
        except Exception as exc:  # noqa: BLE001 - reported to the driver by info()
            self.load_error = _error_text(exc)

    def _load(self) -> Any:
        from .facade import Editor

        return Editor.load(self.spec.load)

    def info(self) -> dict[str, Any]:
        import torch

        ed = self.lazy._editor
        return {"worker": self.index, "pid": os.getpid(), "host": socket.gethostname(),
                "threads": torch.get_num_threads(), "load_error": self.load_error,
                "device": None if ed is None else str(ed.device),
                "native_size": None if ed is None else ed.native_size,
                "notice": None if ed is None else ed.notice}

    def batch_item(self, item: BatchItem, out: str, defaults: dict[str, Any] | None,
                   reconstruction: bool, use_cache: bool, native: bool,
                   min_reconstruction_psnr: float | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        rec = run_item(self.lazy, item, Path(out), defaults=defaults,
                       reconstruction=reconstruction, use_cache=use_cache, edits_bar=_NoBar(),
                       native=native, min_reconstruction_psnr=min_reconstruction_psnr)
        return {"record": rec.to_json(), "seconds": time.perf_counter() - t0}

    def compare_group(self, cases: list[C.Case], configs: list[C.Config], out: str,
                      use_cache: bool, convention: str, native: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        rows = C.run_group(self.lazy.get(), cases, configs, Path(out), use_cache=use_cache,
                           convention=convention, native=native, progress=False, bar=_NoBar())
        return {"rows": [r.plain() for r in rows], "seconds": time.perf_counter() - t0}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class WorkerPool:
    """Ray started (or joined), and ``workers`` actors loading the model; a context manager.

    Without ``address`` a local Ray instance is started with as many CPUs as this machine
    has (at least one per worker) and stopped on exit; with ``address`` the cluster is
    joined and only this run's actors are removed on exit. A Ray already initialised in
    this process (a test's) is used as it is and left running.
    """

    def __init__(self, spec: ModelSpec, options: EngineOptions) -> None:
        self.spec, self.options = spec, options
        self.ray: Any = None
        self.owned = False
        self.actors: list[Any] = []
        self.pending: dict[Any, int] = {}
        self.infos: dict[int, dict[str, Any]] = {}
        self.load_errors: dict[int, str] = {}
        self.deaths: collections.Counter[int] = collections.Counter()
        self.free: collections.deque[int] = collections.deque()
        #: workers Ray is restarting: when to ask again whether they are up, and since when
        self.restarting: dict[int, tuple[float, float]] = {}
        self.t_start = time.monotonic()

    # -- start and stop ---------------------------------------------------------------------

    def __enter__(self) -> WorkerPool:
        ray = self.ray = import_ray()
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        opts = self.options
        cores = _cores()
        if not ray.is_initialized():
            self.owned = True
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            if opts.address:
                ray.init(address=opts.address, **quiet)
            else:
                ray.init(num_cpus=max(cores, opts.workers or 1), include_dashboard=False, **quiet)
        try:
            self._start_actors()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        ray = self.ray
        if ray is None:
            return
        if self.owned:
            ray.shutdown()
        else:
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001, S110 - gone already
                    pass
        self.ray = None

    def _start_actors(self) -> None:
        ray, opts = self.ray, self.options
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        gpw = opts.gpus_per_worker
        n = opts.workers or (int(gpus // gpw) if gpw else int(cpus)) or 1
        if gpw and self.owned and not opts.address and gpus < gpw * n:
            raise ValueError(f"--gpus-per-worker {gpw:g} x {n} worker(s) needs {gpw * n:g} GPU(s); "
                             f"Ray sees {gpus:g} on this machine")
        per_cpu = max(1, int(cpus // n)) if not opts.address else 1
        spec = dataclasses.replace(self.spec, threads=self.spec.threads or per_cpu)
        remote = ray.remote(Worker).options(
            num_cpus=per_cpu if not opts.address else 1, num_gpus=gpw or None,
            max_restarts=-1, max_task_retries=0)
        self.actors = [remote.remote(spec, i) for i in range(n)]
        self.pending = {a.info.remote(): i for i, a in enumerate(self.actors)}

    # -- readiness --------------------------------------------------------------------------

    def _probe(self, w: int) -> None:
        self.pending[self.actors[w].info.remote()] = w

    def _accept(self, ref: Any) -> None:
        """A worker's ``info()`` came back: it is ready, it is still being restarted (ask
        again in a second), or it cannot load the model (dropped, with the reason)."""
        w = self.pending.pop(ref)
        now = time.monotonic()
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:  # restarting (killed while loading...)
            since = self.restarting.get(w, (now, now))[1]
            if now - since > START_TIMEOUT_S:
                self.load_errors[w] = f"not back {START_TIMEOUT_S:.0f} s after it died ({exc})"
                self.restarting.pop(w, None)
            else:
                self.restarting[w] = (now + 1.0, since)
            return
        except Exception as exc:  # noqa: BLE001 - a worker that never came up
            self.load_errors[w] = _error_text(exc)
            return
        self.restarting.pop(w, None)
        if info.get("load_error"):
            self.load_errors[w] = info["load_error"]
            try:
                self.ray.kill(self.actors[w], no_restart=True)
            except Exception:  # noqa: BLE001, S110
                pass
            return
        self.infos.setdefault(w, info)
        self.free.append(w)

    def _reprobe(self) -> None:
        now = time.monotonic()
        for w, (due, _) in list(self.restarting.items()):
            if due <= now and w not in self.pending.values():
                self._probe(w)

    def _alive(self, busy: int) -> bool:
        """Whether some worker is up, coming up or busy; ``ValueError`` when none ever came
        up (every one failed to load the model, or none started in time)."""
        if self.free or self.pending or self.restarting or busy:
            if not self.infos and time.monotonic() - self.t_start > START_TIMEOUT_S:
                raise ValueError(f"no Ray worker came up within {START_TIMEOUT_S:.0f} s: does "
                                 "the cluster have the CPUs / GPUs the workers ask for free?")
            return True
        if not self.infos:
            reason = next(iter(self.load_errors.values()), "unknown reason")
            raise ValueError(f"no Ray worker could load the model: {reason}")
        return False

    def _wait(self, refs: list[Any]) -> list[Any]:
        if not refs:
            time.sleep(0.5)
            return []
        timeout = 0.5 if self.restarting else 10.0
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return done

    def first_info(self) -> dict[str, Any]:
        """The first ready worker's facts (pid, host, device, native size, notice)."""
        while not self.infos:
            self._alive(0)
            self._reprobe()
            for ref in self._wait(list(self.pending)):
                self._accept(ref)
        return self.infos[min(self.infos)]

    # -- the driver's loop ------------------------------------------------------------------

    def run(self, units: Sequence[Any], call: Callable[[Any, Any], Any],
            on_result: Callable[[Any, dict[str, Any], dict[str, Any]], None],
            on_give_up: Callable[[Any, str], None]) -> None:
        """Run every unit on some worker: ``call(actor, unit)`` submits it, ``on_result(unit,
        value, worker_info)`` takes what came back. A unit whose worker died is run again
        (on the first worker up) up to ``retries`` times, then, like a unit whose task
        raised, handed to ``on_give_up(unit, reason)``. One unit in flight per worker;
        a worker Ray is restarting gets nothing until it answers again."""
        ray = self.ray
        errors = ray.exceptions
        queue = collections.deque(range(len(units)))
        attempts = [0] * len(units)
        inflight: dict[Any, tuple[int, int]] = {}
        while queue or inflight:
            self._reprobe()
            while self.free and queue:
                w, u = self.free.popleft(), queue.popleft()
                inflight[call(self.actors[w], units[u])] = (w, u)
            if not self._alive(len(inflight)):
                reasons = "; ".join(sorted(set(self.load_errors.values()))) or "unknown reason"
                for u in queue:
                    on_give_up(units[u], f"no Ray worker left ({reasons})")
                return
            for ref in self._wait([*inflight, *self.pending]):
                if ref in self.pending:
                    self._accept(ref)
                    continue
                w, u = inflight.pop(ref)
                try:
                    value = ray.get(ref)
                except errors.RayActorError as exc:
                    attempts[u] += 1
                    self.deaths[w] += 1
                    now = time.monotonic()
                    self.restarting[w] = (now, now)  # ask at once whether it is back
                    if attempts[u] <= self.options.retries:
                        queue.appendleft(u)
                    else:
                        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                        on_give_up(units[u], f"its Ray worker died {attempts[u]} time(s) while "
                                             f"running it ({type(exc).__name__}: {why})")
                    continue
                except errors.RayTaskError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    on_give_up(units[u], _error_text(cause))
                else:
                    on_result(units[u], value, self.infos[w])
                self.free.append(w)

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """Per worker: where it ran and how often Ray restarted it."""
        return {str(w): {"host": i["host"], "device": i["device"], "threads": i["threads"],
                         "restarts": self.deaths[w]} for w, i in self.infos.items()}


# -- batch ---------------------------------------------------------------------------------------


def check_out(out_dir: str | Path, options: EngineOptions) -> Path:
    """``--out``, created; on a cluster (``--address``) it must be an absolute path, the
    same shared folder on every node."""
    if options.address and not Path(out_dir).is_absolute():
        raise ValueError(f"--out {str(out_dir)!r} is relative: with --address the workers on "
                         "other machines write there, so give an absolute path on storage "
                         "every node mounts at that path")
    return check_output_folder(out_dir)


def _absolute(item: BatchItem) -> BatchItem:
    """``item`` with absolute paths, for workers whose working folder is not the driver's."""
    def ab(p: Path | None) -> Path | None:
        return None if p is None else p.absolute()

    return dataclasses.replace(item, image=ab(item.image), mask=ab(item.mask),
                               edits=[dataclasses.replace(e, mask=ab(e.mask)) for e in item.edits])


def run_batch_ray(
    spec: ModelSpec,
    items: list[BatchItem],
    out_dir: str | Path,
    *,
    engine: EngineOptions,
    defaults: dict[str, Any] | None = None,
    reconstruction: bool = True,
    use_cache: bool = True,
    progress: bool = True,
    manifest: str | None = None,
    native: bool = False,
    min_reconstruction_psnr: float | None = None,
) -> BatchReport:
    """:func:`editor.batch.run_batch` on Ray workers: same outputs, summary and resume.

    Items already complete are recorded by the driver (marked ``resumed``) without
    starting Ray; the rest go to the workers, one at a time each. The summary is rewritten
    after every record, in manifest order, with per-worker items, busy seconds and
    items per second."""
    out = check_out(out_dir, engine)
    with OutputLock(out, "pivot-edit batch run"):
        run = BatchRun(items, out, defaults=defaults, manifest=manifest, engine="ray")
        bar = tqdm(total=len(items), desc="items", unit="item", disable=not progress)
        todo = []
        for item in items:
            if item_done(item, out, reconstruction=reconstruction):
                run.add(resumed_record(item, out, reconstruction=reconstruction))
                bar.update(1)
            else:
                todo.append(item)
        try:
            if todo:
                _batch_on_workers(spec, engine, todo, out, run, bar, defaults=defaults,
                                  reconstruction=reconstruction, use_cache=use_cache,
                                  native=native, min_reconstruction_psnr=min_reconstruction_psnr)
        finally:
            bar.close()
        return run.finish()


def _batch_on_workers(spec: ModelSpec, engine: EngineOptions, todo: list[BatchItem], out: Path,
                      run: BatchRun, bar: Any, *, defaults: dict[str, Any] | None,
                      reconstruction: bool, use_cache: bool, native: bool,
                      min_reconstruction_psnr: float | None) -> None:
    where = str(out.absolute())

    def call(actor: Any, item: BatchItem) -> Any:
        return actor.batch_item.remote(_absolute(item), where, defaults, reconstruction,
                                       use_cache, native, min_reconstruction_psnr)

    def on_result(item: BatchItem, value: dict[str, Any], info: dict[str, Any]) -> None:
        rec = ItemRecord(**value["record"])
        rec.image = str(item.image)  # as the manifest gave it, not the worker's absolute path
        run.add(rec, worker=None if rec.resumed else str(info["worker"]),
                seconds=value["seconds"], worker_info={"host": info["host"]})
        bar.set_postfix_str(item.id)
        bar.update(1)

    def on_give_up(item: BatchItem, reason: str) -> None:
        run.add(failed_record(item, out, reconstruction=reconstruction, error=reason))
        bar.update(1)

    with WorkerPool(spec, engine) as pool:
        try:
            pool.run(todo, call, on_result, on_give_up)
        finally:
            for key, stats in pool.worker_stats().items():
                run.workers.setdefault(key, {"worker": key, "items": 0, "seconds": 0.0,
                                             "items_per_s": None}).update(stats)


# -- compare -------------------------------------------------------------------------------------


def _row(d: dict[str, Any], out: Path) -> C.Row:
    row = C.Row(d["case"], d["kind"], d["config"], d["status"], d["error"], d["values"])
    if row.status == "ok":
        with Image.open(out / "raw" / slugify(row.config) / f"{row.case}.png") as im:
            row.image = im.convert("RGB")
    return row


def run_compare_ray(
    pool: WorkerPool, cases: list[C.Case], configs: list[C.Config], out_dir: str | Path, *,
    convention: str = "select", use_cache: bool = True, progress: bool = True,
    title: str = "comparison", notes: Sequence[str] = (), native: bool = False,
) -> C.CompareReport:
    """:func:`editor.compare.run_compare` on a started :class:`WorkerPool`: one inversion
    group (the configurations that share an inversion setting) per task; the workers write
    ``OUT/raw/``, the driver the grid and tables. Same files as the local engine."""
    C.check_setup(cases, configs)
    out = check_out(out_dir, pool.options)
    with OutputLock(out, "pivot-edit compare run"):
        t_start = time.perf_counter()
        (out / "raw").mkdir(parents=True, exist_ok=True)
        groups = C.inversion_groups(configs)
        cases_ref = pool.ray.put(cases)
        rows: list[C.Row] = []
        busy: collections.Counter[str] = collections.Counter()
        bar = tqdm(total=len(cases) * len(configs), desc="compare", unit="edit",
                   disable=not progress)
        where = str(out.absolute())

        def call(actor: Any, group: list[C.Config]) -> Any:
            return actor.compare_group.remote(cases_ref, group, where, use_cache, convention,
                                              native)

        def on_result(group: list[C.Config], value: dict[str, Any], info: dict[str, Any]) -> None:
            rows.extend(_row(d, out) for d in value["rows"])
            busy[str(info["worker"])] += value["seconds"]
            bar.update(len(value["rows"]))

        def on_give_up(group: list[C.Config], reason: str) -> None:
            rows.extend(C.Row(c.id, c.kind, cfg.name, "failed", reason)
                        for cfg in group for c in cases)
            bar.update(len(group) * len(cases))

        try:
            pool.run(groups, call, on_result, on_give_up)
        finally:
            bar.close()
        stats = pool.worker_stats()
        note = (f"Ray engine: {len(groups)} inversion group(s) on {len(stats)} worker(s); "
                + "; ".join(f"worker {w}: {busy[w]:.1f} s busy, {s['restarts']} restart(s)"
                            for w, s in stats.items()))
        return C.finish_compare(cases, configs, C.in_config_order(rows, configs), out,
                                title=title, notes=[*notes, note], convention=convention,
                                seconds=time.perf_counter() - t_start)
