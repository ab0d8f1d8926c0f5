"""The ``pivot-edit`` command line.

One function per subcommand (``cmd_generate``, ``cmd_ui``, ...), all registered
in :func:`build_parser`. Engine errors (``ValueError``) become one line
``pivot-edit: error: ...`` and exit status 2. ``pivot-edit bench <what>``
prints JSON.

    pivot-edit generate "a red circle on a white background" -o out.png --model shapes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fileio import IMAGE_SUFFIXES, check_output_file, check_output_folder, printable
from .options import (
    BLEND_MAPS,
    EDIT_MODES,
    ENGINES,
    LEAKAGE_MODES,
    MASK_MODES,
    METHODS,
    SELF_LAYER_RULES,
    EditOptions,
    EngineOptions,
    GenerateOptions,
    InvertOptions,
    LoadOptions,
)
from .progress import quiet_libraries

if TYPE_CHECKING:  # pragma: no cover
    from .facade import Editor

PROG = "pivot-edit"
#: the defaults every flag shows, read from the options dataclasses (never written twice)
_INV, _EDIT, _GEN, _LOAD = InvertOptions(), EditOptions(), GenerateOptions(), LoadOptions()
_ENG = EngineOptions()


def given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """``{option: value}`` for the flags the user gave (``mapping``: option -> attribute)."""
    return {opt: getattr(args, attr) for opt, attr in mapping.items()
            if getattr(args, attr, None) is not None}


# -- shared helpers ---------------------------------------------------------------------------


#: The environment variable that sets the default ``--model`` (the model a user configured).
MODEL_ENV = "PIVOT_EDIT_MODEL"


def default_model(fallback: str = "auto") -> str:
    return os.environ.get(MODEL_ENV) or fallback


def add_model_args(parser: argparse.ArgumentParser, *, default: str | None = None,
                   config_flags: tuple[str, ...] = ("--config", "--model-config")) -> None:
    """Options every model-loading subcommand shares (:class:`~editor.options.LoadOptions`):
    --model, --config (``--model-config``; only that in ``compare``, whose ``--config`` is a
    run configuration), --prediction-type, --lora, --offload, --vae-tiling, --vae-slicing,
    --device, --dtype, and --threads."""
    from .options import DTYPE_NAMES, OFFLOAD_MODES, PREDICTION_TYPES

    shown = default or f"${MODEL_ENV}, else auto"
    parser.add_argument(
        "--model", default=default or default_model(),
        help="'auto' (SD 1.5 if cached or reachable, else the bundled model), 'shapes' "
             "(bundled), a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
             "a local diffusers folder, or a single-file .safetensors checkpoint (SD 1.x, "
             f"SD 2.x, SDXL base; .ckpt pickles are refused) (default: {shown})",
    )
    parser.add_argument(*config_flags, dest="model_config", default=_LOAD.config, metavar="FOLDER",
                        help="with --model FILE.safetensors: a diffusers folder (configs only) "
                             "of the checkpoint's architecture (default: the bundled config "
                             "for the detected SD 1.x / SD 2.x / SDXL base)")
    parser.add_argument("--prediction-type", default=_LOAD.prediction_type,
                        choices=list(PREDICTION_TYPES),
                        help="what the UNet predicts (default: the checkpoint's own; SD 2.x "
                             "single files: v_prediction)")
    parser.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                        help="a LoRA .safetensors file and its scale (default 1), fused into "
                             "the weights; repeat for several")
    parser.add_argument("--offload", default=_LOAD.offload, choices=list(OFFLOAD_MODES),
                        help="GPU with little memory: keep weights in main memory and move "
                             "each model ('model') or each layer ('sequential', least memory, "
                             f"slowest) to the GPU while it runs (default: {_LOAD.offload})")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode/encode large images tile by tile (less memory)")
    parser.add_argument("--vae-slicing", action="store_true",
                        help="decode/encode a batch one image at a time (less memory)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES),
                        help="weights dtype (default: float32 on CPU, float16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: the cores not already busy, at "
                             "least 1: two processes on two cores each get one, instead of "
                             "fighting over both)")


def load_options(args: argparse.Namespace, model: str | None = None) -> LoadOptions:
    """The :class:`~editor.options.LoadOptions` the model flags say (``model``: instead of
    ``--model``)."""
    return LoadOptions(
        model=model if model is not None else args.model, device=args.device, dtype=args.dtype,
        config=getattr(args, "model_config", None),
        prediction_type=getattr(args, "prediction_type", None),
        loras=tuple(getattr(args, "lora", None) or ()),
        offload=getattr(args, "offload", None) or _LOAD.offload,
        vae_tiling=bool(getattr(args, "vae_tiling", False)),
        vae_slicing=bool(getattr(args, "vae_slicing", False)))


def free_cores() -> int:
    """Cores this process may use that are not busy right now (load average), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def configure_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads``, or :func:`free_cores` (returned)."""
    import torch

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    n = threads or free_cores()
    torch.set_num_threads(n)
    return n


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--seed, --steps, --guidance (DDIM sampling with classifier-free guidance)."""
    parser.add_argument("--seed", type=int, default=_GEN.seed,
                        help=f"random seed (default: {_GEN.seed})")
    parser.add_argument("--steps", type=int, default=_GEN.steps,
                        help=f"DDIM steps (default: {_GEN.steps})")
    parser.add_argument("--guidance", type=float, default=_GEN.guidance,
                        help=f"classifier-free guidance scale (default: {_GEN.guidance})")


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions.from_mapping(given(args, {"seed": "seed", "steps": "steps",
                                                     "guidance": "guidance"}))


def check_auto_for_inversion(inversion) -> None:
    """Before ``--model auto`` downloads SD 1.5 for an inversion made with another model
    (which would then be refused): say so, and name the flags that load the right one."""
    from .loading import SD15, _hub_cached, resolve_model

    if inversion.model_id in (SD15, "auto") or _hub_cached(SD15):
        return  # the same model (an auto load records "auto"), or no download: the
        # fingerprint check decides
    location, _ = resolve_model("auto")
    if location == SD15:
        made = printable(inversion.model_id)
        raise ValueError(
            f"this inversion was made with model {made!r}, but --model auto would download "
            f"{SD15} (about 4 GB) and then refuse it; pass --model {made} or "
            "--model-from-inversion")


def load_editor(args: argparse.Namespace, inversion=None) -> Editor:
    """Load the model named by ``args.model``; print the fallback notice (if any) to stderr.

    An inversion file never chooses what is loaded: only with ``--model-from-inversion``
    is its recorded model loaded, and then what it names is printed first.
    """
    from .facade import Editor

    quiet_libraries()
    configure_threads(getattr(args, "threads", None))
    model = args.model
    if inversion is not None and model == "auto" and not getattr(args, "model_from_inversion", False):
        check_auto_for_inversion(inversion)
    if inversion is not None and getattr(args, "model_from_inversion", False):
        model = inversion.model_id
        print(f"loading the model the inversion file names: {printable(model)!r}",
              file=sys.stderr)
    editor = Editor.load(load_options(args, model))
    if editor.notice:
        print(editor.notice, file=sys.stderr)
    if inversion is not None:
        inversion.check_model(editor)  # before any work: a clear message, and the hint
    return editor


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--engine, --address, --workers, --gpus-per-worker, --retries (batch and compare)."""
    parser.add_argument("--engine", default=_ENG.engine, choices=list(ENGINES),
                        help="local: this process, one device (default); ray: one Ray actor "
                             "per worker, each loading the model once (pip install "
                             "\"pivot-edit[ray]\"; docs/batch-and-compare.md)")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="Ray cluster to join (--out must then be an absolute path on "
                             "shared storage); default: start a local Ray instance")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="Ray workers (default: this machine's cores, or the cluster's "
                             "GPUs / --gpus-per-worker)")
    parser.add_argument("--gpus-per-worker", type=float, default=None, metavar="F",
                        help="GPUs each Ray worker reserves (1: one worker per GPU; default 0)")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="runs again of an item whose Ray worker died, before it is "
                             f"recorded as failed (default: {_ENG.retries})")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    opts = EngineOptions.from_mapping(given(args, {
        "engine": "engine", "address": "address", "workers": "workers",
        "gpus_per_worker": "gpus_per_worker", "retries": "retries"}))
    if opts.engine == "ray":
        from .ray_engine import import_ray

        import_ray()  # not installed: one line naming the extra, before any work
    return opts


def model_spec(args: argparse.Namespace):
    """What each Ray worker loads: the model flags, local files and folders made absolute
    (a worker's working folder is not this one's)."""
    import dataclasses

    from .options import LoraSpec
    from .ray_engine import ModelSpec

    def here(path: str | None) -> str | None:
        return str(Path(path).absolute()) if path and Path(path).exists() else path

    opts = load_options(args)
    model = opts.model if opts.model in ("auto", "shapes") else here(opts.model)
    opts = dataclasses.replace(opts, model=model, config=here(opts.config), loras=tuple(
        LoraSpec(here(lo.path), lo.scale) for lo in opts.loras))
    return ModelSpec(opts, threads=args.threads)


def _save_image(image, out: Path) -> Path:
    """Write ``image`` atomically (a temporary file renamed into place): nothing half-written."""
    from .fileio import atomic_save_image

    return atomic_save_image(image, check_output_file(out, IMAGE_SUFFIXES))


# -- subcommands ------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """Text to image."""
    out = check_output_file(args.output, IMAGE_SUFFIXES)  # fail before loading
    options = generate_options(args)
    editor = load_editor(args)
    image = editor.generate(args.prompt, options)
    _save_image(image, out)
    print(out)
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` -> ``("user", "pass")`` for the web app's basic login (None: no login)."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


_SIZE_RE = re.compile(r"(\d+(\.\d+)?)\s*(b|kb|mb|gb)", re.IGNORECASE)
_HOST_RE = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def check_file_size(text: str) -> str:
    """``--max-file-size``: a number and a unit (b, kb, mb, gb), e.g. ``10mb``."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--max-file-size must be a size such as 10mb, 500kb or 1gb, got "
                         f"{printable(text)!r}")
    return text.strip().lower()


def check_host(host: str) -> str:
    """``--host``: an IP address or a host name (``0.0.0.0`` for every interface)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if re.fullmatch(r"[\d.]+", host) or not _HOST_RE.fullmatch(host):
        raise ValueError(f"--host must be an IP address (127.0.0.1, 0.0.0.0, ::1) or a host "
                         f"name, got {printable(host)!r}")
    return host


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the web app (ui/app.py) on ``--host``:``--port``; loopback unless told otherwise."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    auth = parse_auth(args.auth)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    args.host = check_host(args.host)
    args.max_file_size = check_file_size(args.max_file_size)
    try:
        from ui.app import CSS, build_demo
    except ImportError as exc:
        raise ValueError(f"the web app needs gradio ({exc}); pip install 'pivot-edit[ui]'") from None
    if args.host not in LOOPBACK and auth is None and not args.share:
        print(f"warning: serving on {printable(args.host)} without --auth: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    if args.share and auth is None:
        print("warning: --share without --auth: anyone with the link can use the model",
              file=sys.stderr)
    editor = load_editor(args)
    demo = build_demo(editor)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                max_file_size=args.max_file_size, footer_links=["api"], css=CSS)
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    """Time loading the model and one generation; print JSON."""
    import torch

    from .bench import machine

    t0 = time.perf_counter()
    editor = load_editor(args)
    load_s = time.perf_counter() - t0

    def _sync() -> None:
        if editor.device.type == "cuda":
            torch.cuda.synchronize(editor.device)

    prompt = args.prompt
    options = generate_options(args)
    editor.generate(prompt, options.replace(steps=1))  # warm-up
    _sync()
    t0 = time.perf_counter()
    editor.generate(prompt, options)
    _sync()
    gen_s = time.perf_counter() - t0
    result = {
        "model_id": editor.model_id,
        "fingerprint": editor.fingerprint,
        "device": str(editor.device),
        "dtype": str(editor.dtype).removeprefix("torch."),
        "native_size": editor.native_size,
        "load_seconds": round(load_s, 3),
        "steps": options.steps,
        "generate_seconds": round(gen_s, 3),
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Invert each manifest image once and apply its edits; exit 1 if any item failed."""
    from .batch import plan, read_manifest, run_batch

    items = read_manifest(args.manifest)  # ManifestError (a ValueError) -> exit 2
    engine = engine_options(args)
    if not args.dry_run:
        if engine.engine == "ray":
            from .ray_engine import check_out

            check_out(args.out, engine)
        check_output_folder(args.out)
    defaults = {"method": args.method, "steps": args.steps, "guidance": args.guidance,
                "num_inner_steps": args.num_inner_steps}
    InvertOptions.from_mapping({k: v for k, v in defaults.items() if v is not None})
    if args.dry_run:
        print("\n".join(plan(items, args.out, defaults=defaults,
                             reconstruction=not args.no_reconstruction)))
        return 0
    if engine.engine == "ray":
        from .ray_engine import run_batch_ray

        report = run_batch_ray(model_spec(args), items, args.out, engine=engine,
                               defaults=defaults, reconstruction=not args.no_reconstruction,
                               use_cache=not args.no_cache, manifest=str(args.manifest),
                               native=args.native,
                               min_reconstruction_psnr=args.min_reconstruction_psnr)
    else:
        report = run_batch(lambda: load_editor(args), items, args.out, defaults=defaults,
                           reconstruction=not args.no_reconstruction, use_cache=not args.no_cache,
                           manifest=str(args.manifest), native=args.native,
                           min_reconstruction_psnr=args.min_reconstruction_psnr)
    for rec in report.failed:
        print(f"{PROG}: item {rec.id} failed: {printable(rec.error)}", file=sys.stderr)
    n = len(report.records)
    print(f"{n - len(report.failed)}/{n} item(s) ok; summary: {Path(args.out) / 'summary.json'}")
    return report.exit_status


def cmd_compare(args: argparse.Namespace) -> int:
    """Run images x edits through several configurations; write grid, tables, raw outputs."""
    from . import compare as C

    engine = engine_options(args)
    if engine.engine == "ray":
        from .ray_engine import check_out

        check_out(args.out, engine)
    check_output_folder(args.out)  # before any model loads

    def csv_list(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    invert = {k: v for k, v in {"steps": args.steps, "guidance": args.guidance,
                                "num_inner_steps": args.num_inner_steps}.items() if v is not None}
    base_edit = C.PIE_P2P if args.pie_bench else None  # PIE-Bench's published P2P settings
    configs = C.default_configs(csv_list(args.methods) or C.METHODS, csv_list(args.leakage),
                                invert=invert, edit=base_edit) if not args.config or args.methods else []
    configs += [C.parse_config(spec, invert) for spec in args.config or []]
    notes: list[str] = []
    if args.bench == "shapes":
        title = "ShapesBench"
        if args.steps is None:  # a few minutes on CPU; --steps 50 for the published protocol
            for cfg in configs:
                cfg.invert.setdefault("steps", C.SHAPES_BENCH_STEPS)
        convention = args.mask_convention or "select"
    elif args.pie_bench:
        title = "PIE-Bench"
        notes.append(C.PIE_NOTE)
        cases = C.load_pie_bench(args.pie_bench, types=csv_list(args.pie_types), limit=args.limit)
        convention = args.mask_convention or "zero"
    else:
        title = f"comparison on {args.manifest}"
        cases = C.manifest_cases(args.manifest)[: args.limit]
        convention = args.mask_convention or "select"
    if engine.engine == "ray":
        from .ray_engine import WorkerPool, run_compare_ray

        with WorkerPool(model_spec(args), engine) as pool:
            info = pool.first_info()
            if info.get("notice"):
                print(info["notice"], file=sys.stderr)
            if args.bench == "shapes":
                cases = C.shapes_bench(args.n, seed=args.seed, size=info["native_size"])
            report = run_compare_ray(pool, cases, configs, args.out, convention=convention,
                                     use_cache=not args.no_cache, title=title, notes=notes,
                                     native=args.native)
    else:
        editor = load_editor(args)
        if args.bench == "shapes":
            cases = C.shapes_bench(args.n, seed=args.seed, size=editor.native_size)
        report = C.run_compare(editor, cases, configs, args.out, convention=convention,
                               use_cache=not args.no_cache, title=title, notes=notes,
                               native=args.native)
    for line in C.markdown_table(report.summary()).splitlines():
        print(printable(line))
    for note in report.notes:
        print(f"note: {printable(note)}")
    out = Path(args.out)
    print(f"grid: {out / 'grid.png'}; tables: {out / 'metrics.csv'}, {out / 'summary.md'}")
    return 0


# -- parser -----------------------------------------------------------------------------------


def cmd_invert(args: argparse.Namespace) -> int:
    """Invert an image under its caption and save the inversion (safetensors + JSON)."""
    out = check_output_file(args.output, (".safetensors",))
    from .images import load_image

    options = InvertOptions.from_mapping(given(args, {
        "method": "method", "steps": "steps", "guidance": "guidance",
        "num_inner_steps": "inner_steps", "early_stop_epsilon": "early_stop",
        "max_pixels": "max_pixels"}))
    if args.no_early_stop:
        options = options.replace(early_stop_epsilon=None)
    load_image(args.image)  # a bad file fails before the model loads
    editor = load_editor(args)
    warn_working_size(editor, options.max_pixels)
    inv = editor.invert(args.image, args.prompt, options)
    inv.save(out)
    psnr_db = inv.stats.get("reconstruction_psnr")
    quality = f", reconstruction {psnr_db:.1f} dB" if psnr_db is not None else ""
    print(f"{out}  ({inv.method}, {inv.steps} steps, {inv.image_size[0]}x{inv.image_size[1]}, "
          f"{inv.stats['seconds']:.1f} s{quality})")
    if inv.stats.get("warning"):
        print(f"warning: {inv.stats['warning']}", file=sys.stderr)
    return 0


def warn_working_size(editor: Editor, max_pixels: int | None) -> None:
    """A working resolution above the model's native budget costs time and memory roughly in
    proportion (attention: more than that); say so."""
    native = editor.native_size**2
    if max_pixels and max_pixels > native:
        print(f"warning: working at {max_pixels / native:.1f}x the model's native pixel budget "
              f"({editor.native_size}x{editor.native_size}): inversion and edits take at least "
              "that much longer and more memory, and the model may draw worse away from its "
              "native size", file=sys.stderr)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Sample an inversion back to an image with its own prompt."""
    from .inversion import Inversion

    inv = Inversion.load(args.inversion)
    out = check_output_file(args.output, IMAGE_SUFFIXES)
    editor = load_editor(args, inv)
    out = _save_image(editor.reconstruct(inv), out)
    print(out)
    return 0


def parse_reweight(items: Sequence[str] | None) -> dict[str, float]:
    """``["fluffy=2", "red=0.5"]`` -> ``{"fluffy": 2.0, "red": 0.5}``."""
    out: dict[str, float] = {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        if not sep or not word.strip():
            raise ValueError(f"--reweight expects WORD=SCALE, got {item!r}")
        try:
            out[word.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--reweight {item!r}: {value!r} is not a number") from None
    return out


def resolve_original(value: str | None, inv) -> str | None:
    """``--original``: a path, or ``auto`` for the source path the inversion file records
    (used only when asked; checked against the inversion's pixels by the engine)."""
    if value is None:
        return None
    if value != "auto":
        return value
    path = str((inv.source or {}).get("path", ""))
    if not path:
        raise ValueError("--original auto: this inversion records no source image; give the "
                         "path of the photo it was made from")
    if not Path(path).is_file():
        raise ValueError(f"--original auto: the recorded source image {printable(path)!r} is "
                         "no longer there; give its path")
    return path


def edit_options(args: argparse.Namespace) -> EditOptions:
    """The edit flags as :class:`EditOptions` (only the flags given override defaults)."""
    values = given(args, {"cross_replace": "cross_replace", "self_replace": "self_replace",
                          "mode": "mode", "protect": "protect", "guidance": "guidance",
                          "blend_subtract": "blend_subtract", "noise_threshold": "mask_threshold",
                          "leakage": "leakage", "blend_threshold": "blend_threshold",
                          "blend_maps": "blend_maps", "self_max_fraction": "self_layers",
                          "mask_mode": "mask_mode"})
    reweight = parse_reweight(args.reweight)
    if reweight:
        values["reweight"] = reweight
    if args.no_blend:
        values["blend_words"] = None
    elif args.blend:
        values["blend_words"] = args.blend
    return EditOptions.from_mapping(values)


def edit_outputs(output: str, n: int) -> list[Path]:
    """Where ``pivot-edit edit`` writes: ``-o OUT.png`` for one target; for several,
    ``OUT-1.png, OUT-2.png, ...``, or ``edit-1.png, ...`` inside ``-o`` when it is a folder."""
    out = Path(output)
    if out.is_dir() or output.endswith(("/", "\\")):
        if not out.is_dir():
            raise ValueError(f"output folder {output!r} does not exist")
        outs = [out / (f"edit-{k}.png" if n > 1 else "edit.png") for k in range(1, n + 1)]
    elif out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"output {output!r} must end in .png, .jpg, .jpeg or .webp (or be a folder)")
    else:
        outs = [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}")
                                     for k in range(1, n + 1)]
    for o in outs:
        check_output_file(o, IMAGE_SUFFIXES)
    return outs


def cmd_edit(args: argparse.Namespace) -> int:
    """Prompt-to-Prompt edit of an inversion file; several --target run as one batch."""
    from .inversion import Inversion

    inv = Inversion.load(args.inversion)
    targets = list(args.target)
    outs = edit_outputs(args.output, len(targets))  # every output checked before any work
    source = check_output_file(args.source, IMAGE_SUFFIXES, "--source") if args.source else None
    options = edit_options(args)
    original = resolve_original(args.original, inv)
    if args.mask is not None:
        from .compose import load_mask

        load_mask(args.mask, tuple(inv.image_size), what="--mask")  # a bad mask fails now
    editor = load_editor(args, inv)
    results = editor.edit_many(inv, targets, options, mask=args.mask, original=original)
    for res, out in zip(results, outs, strict=True):
        _save_image(res.image, out)
        size = f"{res.image.size[0]}x{res.image.size[1]}"
        print(f"{out}  ({res.options['mode']}: {printable(repr(res.target))}, {size})")
        if res.options.get("notice"):
            print(f"note: {res.options['notice']}", file=sys.stderr)
    if original is None and inv.source and Path(str(inv.source.get("path", ""))).is_file():
        w, h = inv.source.get("size", ["?", "?"])
        print(f"note: the inverted image ({printable(inv.source['path'])}, {w}x{h}) is still "
              "there: add --original auto (or --original PATH) for the edit at its size",
              file=sys.stderr)
    if source is not None:
        print(_save_image(results[0].source, source))
    return 0


def cmd_bench_inversion(args: argparse.Namespace) -> int:
    """Reconstruction PSNR and seconds per inversion method, plus the published loop's time."""
    from .bench import bench_inversion

    editor = load_editor(args)
    methods = tuple(m for m in args.methods.split(",") if m)
    print(json.dumps(bench_inversion(editor, steps=args.steps, guidance=args.guidance,
                                     reference=not args.no_reference, methods=methods), indent=1))
    return 0


def _print_json(out: dict, path: str | None) -> int:
    """Print ``out`` as JSON, and also write it (atomically) to ``path`` when one is given."""
    text = json.dumps(out, indent=1)
    if path:
        from .fileio import atomic_write_bytes

        atomic_write_bytes(Path(path), text.encode())
    print(text)
    return 0


def cmd_bench_early_stop(args: argparse.Namespace) -> int:
    """What null-text's early stop saves (inner steps, seconds) and costs (PSNR); print JSON."""
    from .bench import EARLY_STOP_SEEDS, bench_early_stop

    editor = load_editor(args)
    try:
        ks = tuple(int(k) for k in args.check_every.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--check-every must be a comma list of integers, got "
                         f"{args.check_every!r}") from None
    if any(k < 0 for k in ks):
        raise ValueError("--check-every takes integers >= 0 (0: never)")
    n = args.scenes
    if not 1 <= n <= len(EARLY_STOP_SEEDS):
        raise ValueError(f"--scenes must be 1..{len(EARLY_STOP_SEEDS)}, got {n}")
    out = bench_early_stop(editor, steps=args.steps, num_inner_steps=args.inner_steps,
                           seeds=EARLY_STOP_SEEDS[:n], batch=args.batch, check_every=ks)
    return _print_json(out, args.out)


def cmd_bench_precision(args: argparse.Namespace) -> int:
    """Reconstruction PSNR with a bf16 / fp16 UNet against fp32 (bundled model); print JSON."""
    from .bench import BENCH_SEEDS, bench_precision
    from .model import _DTYPES

    editor = load_editor(args)
    mode = args.mode or ("cuda-graph" if editor.device.type == "cuda" else "static-eager")
    out = bench_precision(editor, steps=args.steps, seeds=BENCH_SEEDS[: args.scenes],
                          dtype=_DTYPES[args.unet_dtype], mode=mode)
    return _print_json(out, args.out)


def cmd_bench_fullres(args: argparse.Namespace) -> int:
    """Peak memory and time of one edit returned at a photo's full size; print JSON."""
    from .bench import bench_fullres

    quiet_libraries()
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 4000x3000, got {args.size!r}") from None
    if not (16 <= w <= 12_000 and 16 <= h <= 12_000):
        raise ValueError("--size: each side 16..12000 pixels")
    print(json.dumps(bench_fullres(size=(w, h), budget=args.budget, steps=args.steps), indent=1))
    return 0


def cmd_bench_requirements(args: argparse.Namespace) -> int:
    """Parameters, weight bytes and the peak memory of one edit / null-text step; print JSON."""
    import torch

    from .bench import bench_requirements

    quiet_libraries()
    configure_threads(args.threads)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(bench_requirements(args.arch, device=device, dtype=dtype, steps=args.steps,
                                        measure=not args.no_measure), indent=1))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    """Null-text inversion and P2P edit speed at SD 1.5 size (random weights); print JSON."""
    from .bench import ALL_GPU_VARIANTS, DEFAULT_GPU_VARIANTS, SDXL_GPU_VARIANTS, bench_gpu

    quiet_libraries()
    smoke = args.cpu_smoke

    def items(text: str | None) -> list[str]:
        return [x.strip() for x in (text or "").split(",") if x.strip()]

    sdxl = args.arch == "sdxl"
    variants = items(args.variants) or list(SDXL_GPU_VARIANTS if sdxl else DEFAULT_GPU_VARIANTS)
    if variants == ["all"]:
        variants = list(ALL_GPU_VARIANTS)
    default_batches = [1] if sdxl else [1, 2] if smoke else [1, 8]
    try:
        batches = tuple(int(b) for b in items(args.batches) or default_batches)
    except ValueError:
        raise ValueError(f"--batches must be a comma list of integers, got {args.batches!r}") from None
    if any(b < 1 for b in batches):
        raise ValueError("--batches must be positive integers")
    out = bench_gpu(
        device=args.device or ("cpu" if smoke else None), smoke=smoke,
        steps=args.steps or (2 if smoke else 50), num_inner_steps=args.inner or (2 if smoke else 10),
        timed_steps=None if args.timed_steps == 0 else args.timed_steps, batches=batches,
        variants=tuple(variants), edit=not args.no_edit,
        quality_steps=(args.quality_steps if args.quality_steps is not None
                       else (2 if smoke else 10)) or None,
        out_path=args.out, log=sys.stderr, arch=args.arch)
    print(json.dumps(out, indent=1))
    return 0


def cmd_bench_batch(args: argparse.Namespace) -> int:
    """Items per second of ``pivot-edit batch`` through one engine; print JSON."""
    from .bench import bench_batch

    engine = engine_options(args)
    quiet_libraries()
    spec = model_spec(args) if engine.engine == "ray" else None
    print(json.dumps(bench_batch(engine, spec.load if spec else load_options(args),
                                 threads=args.threads, items=args.items, steps=args.steps,
                                 method=args.method, out=args.out), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``pivot-edit`` parser; each subparser sets ``func`` to its ``cmd_*``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Edit real images with Stable Diffusion: null-text inversion + "
                    "Prompt-to-Prompt, with leakage controls.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate an image from a text prompt.")
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="image file to write")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ui", help="start the web app",
                       description="Start the web app (Gradio) in the browser. It listens on "
                                   "127.0.0.1 only unless --host or --share says otherwise.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link (needs network access)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require this login (HTTP form login of Gradio)")
    p.add_argument("--max-file-size", default="10mb", metavar="SIZE",
                   help="largest upload, e.g. 10mb, 500kb (default: 10mb)")
    p.set_defaults(func=cmd_ui)

    bench = sub.add_parser("bench", help="measure speed (prints JSON)",
                           description="Benchmarks; each prints one JSON object.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

    p = bench_sub.add_parser("model", help="load time and one generation",
                             description="Time loading the model and one generation.")
    add_model_args(p, default="shapes")
    add_sampling_args(p)
    p.add_argument("--prompt", default="a red circle on a white background")
    p.set_defaults(func=cmd_bench_model)

    p = bench_sub.add_parser(
        "inversion", help="reconstruction PSNR and speed of each inversion method",
        description="Invert fixed generator scenes with every method; report PSNR beside the "
                    "VAE ceiling and seconds, and time the published null-text loop.")
    add_model_args(p, default="shapes")
    p.add_argument("--steps", type=int, default=_INV.steps,
                   help=f"DDIM steps (default: {_INV.steps})")
    p.add_argument("--guidance", type=float, default=_INV.guidance,
                   help=f"guidance (default: {_INV.guidance})")
    p.add_argument("--no-reference", action="store_true", help="skip the published loop")
    p.add_argument("--methods", default="null-text,negative-prompt,direct,ddim",
                   help="comma-separated methods to measure ('' for none: reference timing only)")
    p.set_defaults(func=cmd_bench_inversion)

    p = bench_sub.add_parser(
        "early-stop", help="what null-text's early stop saves and costs, per host check interval",
        description="Invert the model's own scenes with null-text without early stopping and "
                    "with it, the host reading the device-side stop mask every k inner steps "
                    "(1 = the published loop, 0 = never): seconds, inner steps run, "
                    "reconstruction PSNR.")
    add_model_args(p, default="shapes")
    p.add_argument("--steps", type=int, default=_INV.steps,
                   help=f"DDIM steps (default: {_INV.steps})")
    p.add_argument("--inner-steps", type=int, default=_INV.num_inner_steps,
                   help=f"Adam steps per timestep (default: {_INV.num_inner_steps})")
    p.add_argument("--check-every", default="1,2,5,0",
                   help="comma list of host check intervals k (default: 1,2,5,0)")
    p.add_argument("--scenes", type=int, default=8, help="scenes (1..8; default: 8)")
    p.add_argument("--batch", type=int, default=1, help="images per inversion (default: 1)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the JSON here")
    p.set_defaults(func=cmd_bench_early_stop)

    p = bench_sub.add_parser(
        "precision", help="reconstruction PSNR with a bf16 / fp16 UNet against fp32",
        description="Invert fixed scenes in one batch with the fp32 UNet, with the fast path "
                    "on a reduced-precision UNet copy (sampled back in fp32), and with the "
                    "UNet in reduced precision throughout; PSNR of each (target: within "
                    "0.3 dB of fp32).")
    add_model_args(p, default="shapes")
    p.add_argument("--unet-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="the reduced precision (float16: CUDA only; default: bfloat16)")
    p.add_argument("--mode", default=None, choices=["static-eager", "cuda-graph"],
                   help="the fast path's mode (default: cuda-graph on CUDA, else static-eager)")
    p.add_argument("--steps", type=int, default=_INV.steps,
                   help=f"DDIM steps (default: {_INV.steps})")
    p.add_argument("--scenes", type=int, default=4, choices=[1, 2, 3, 4],
                   help="benchmark scenes (default: 4)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the JSON here")
    p.set_defaults(func=cmd_bench_precision)

    p = bench_sub.add_parser(
        "fullres", help="memory and time of an edit returned at a photo's full size",
        description="Invert a generator scene drawn at --size at SD 1.5's pixel budget (an "
                    "SD-1.5-shaped random model, 8x VAE) and edit it with original=: peak "
                    "resident memory of the edit (sampled) and its seconds, as JSON.")
    p.add_argument("--size", default="4000x3000", help="the original's size (default 4000x3000)")
    p.add_argument("--budget", type=int, default=512 * 512,
                   help="working pixel budget (default 512*512, SD 1.5's)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps (default 4)")
    p.set_defaults(func=cmd_bench_fullres)

    p = bench_sub.add_parser(
        "requirements", help="parameters, download size and peak memory of SD 1.5 / SDXL",
        description="Count the parameters of SD 1.5's or SDXL's components from their "
                    "published configs (weights in GB at float16 and float32), then run a DDIM "
                    "inversion, a null-text inversion and a P2P edit on a random-weight SD 1.5 "
                    "pipeline at 512x512 (--steps each) with their peak memory, as JSON.")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of each measured run (default 2)")
    p.add_argument("--no-measure", action="store_true", help="only count parameters")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: the cores not already busy)")
    p.set_defaults(func=cmd_bench_requirements)

    p = bench_sub.add_parser(
        "batch", help="items per second of pivot-edit batch through --engine local or ray",
        description="Run a batch of --items generator scenes (one colour swap each, --method "
                    "inversion with --steps steps) through one engine and print items per "
                    "second (wall time, start-up included; and the workers' busy rate), with "
                    "the machine, as JSON.")
    add_model_args(p, default="shapes")
    p.add_argument("--items", type=int, default=8, help="items in the batch (default 8)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps (default 4)")
    p.add_argument("--method", default="ddim", choices=list(METHODS),
                   help="inversion method (default ddim)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="keep the batch's files here (default: a temporary folder)")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_batch)

    p = bench_sub.add_parser(
        "gpu", help="null-text inversion and P2P edit speed at SD 1.5 size (random weights)",
        description="Time null-text inversion (512x512, 50 steps, 10 inner steps, no early "
                    "stop) at batch 1 and 8 per variant (eager fp32 / bf16, static buffers, "
                    "CUDA graphs, torch.compile) and one P2P edit, on an SD-1.5-shaped model "
                    "with random weights. --cpu-smoke shrinks model and steps to run on a CPU.")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: SD 1.5's shape at 512x512; sdxl: SDXL base's at 1024x1024, "
                        "variants eager-fp32,eager-bf16, batch 1 (default: sd15)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, 2 steps, 2 inner steps, batches 1,2, on the CPU (a check "
                        "that the benchmark runs, not a measurement)")
    p.add_argument("--device", default=None, help="torch device (default: cuda)")
    p.add_argument("--variants", default=None,
                   help="comma list of eager-fp32, static-eager-fp32, cuda-graph-fp32, "
                        "eager-bf16, static-eager-bf16, cuda-graph-bf16, cuda-graph-bf16-cl "
                        "(channels-last), cuda-graph-fp16, compile-bf16, "
                        "compile+cuda-graph-bf16, or 'all' (default: all but the compile "
                        "ones, whose warm-up takes minutes)")
    p.add_argument("--quality-steps", type=int, default=None, metavar="N",
                   help="steps of each variant's whole inversion + reconstruction, whose PSNR "
                        "is compared with eager fp32's (0: skip; default: 10, 2 with "
                        "--cpu-smoke)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default: 1,8)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50)")
    p.add_argument("--inner", type=int, default=None, help="inner steps (default: 10)")
    p.add_argument("--timed-steps", type=int, default=5,
                   help="optimisation timesteps timed and scaled to --steps (0: all; default: 5)")
    p.add_argument("--no-edit", action="store_true",
                   help="skip the P2P edit timings (1 and 4 targets, eager and graphed loop)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the JSON here, rewritten after every variant")
    p.set_defaults(func=cmd_bench_gpu)

    p = sub.add_parser("invert", help="invert an image under its caption",
                       description="Invert IMAGE under its caption; write an inversion file "
                                   "(safetensors with JSON metadata) that edits reuse.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--prompt", required=True, help="caption of the image")
    p.add_argument("--method", default=_INV.method, choices=list(METHODS),
                   help=f"inversion method (default: {_INV.method})")
    p.add_argument("--steps", type=int, default=_INV.steps,
                   help=f"DDIM steps (default: {_INV.steps})")
    p.add_argument("--guidance", type=float, default=_INV.guidance,
                   help=f"guidance (default: {_INV.guidance})")
    p.add_argument("--inner-steps", "--num-inner-steps", dest="inner_steps", type=int,
                   default=_INV.num_inner_steps,
                   help=f"null-text: Adam steps per timestep (default: {_INV.num_inner_steps})")
    p.add_argument("--early-stop", type=float, default=_INV.early_stop_epsilon,
                   help="null-text: stop a timestep when loss < this + i*2e-5 "
                        f"(default: {_INV.early_stop_epsilon})")
    p.add_argument("--no-early-stop", action="store_true", help="always run every inner step")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="working resolution's pixel budget (default: the model's native size "
                        "squared; more costs time and memory)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.safetensors")
    add_model_args(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("reconstruct", help="sample an inversion back to an image",
                       description="Guided sampling from an inversion with its own prompt.")
    p.add_argument("inversion", metavar="FILE.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    add_model_args(p)
    p.add_argument("--model-from-inversion", action="store_true",
                   help="load the model the inversion file records (printed first)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "edit", help="edit an inversion by rewriting its prompt (Prompt-to-Prompt)",
        description="Prompt-to-Prompt edit of INVERSION_FILE. Several --target run in one "
                    "batch and write OUT-1.png, OUT-2.png, ... (or edit-1.png, ... inside a "
                    "folder given as -o). Default: automatic local blending on the region "
                    "the prompt change affects.")
    p.add_argument("inversion", metavar="INVERSION_FILE")
    p.add_argument("--target", action="append", required=True,
                   help="the edited prompt (repeat for several edits of the same image)")
    p.add_argument("--cross-replace", type=float, default=_EDIT.cross_replace,
                   help=f"fraction of steps with injected cross-attention (default: {_EDIT.cross_replace})")
    p.add_argument("--self-replace", type=float, default=_EDIT.self_replace,
                   help=f"fraction of steps with injected self-attention (default: {_EDIT.self_replace})")
    p.add_argument("--blend", nargs="+", metavar="WORD",
                   help="local blending on these words' cross-attention regions (P2P) "
                        "instead of the automatic mask")
    p.add_argument("--blend-subtract", nargs="+", metavar="WORD",
                   help="words whose region is kept out of the blend mask")
    p.add_argument("--no-blend", action="store_true", help="no local blending (plain P2P)")
    p.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                   help="automatic blend mask: threshold on the normalised prediction "
                        f"difference (default {_EDIT.noise_threshold}; 0.3 suits shape swaps, "
                        "see docs/methods.md)")
    p.add_argument("--blend-threshold", type=float, default=None, metavar="T",
                   help="threshold of the word-map blend (--blend WORD..; default "
                        f"{_EDIT.blend_threshold}, as published)")
    p.add_argument("--blend-maps", default=None, choices=list(BLEND_MAPS),
                   help="cross-attention maps the word-map blend reads: 'published' (the down "
                        "and up blocks' coarsest maps, as P2P) or 'half' (every map of at least "
                        f"half the latent's side); default {_EDIT.blend_maps}")
    p.add_argument("--self-layers", default=None, choices=list(SELF_LAYER_RULES),
                   help="which self-attention maps are injected: 'null-text' (at most 1/4 of the "
                        "latent's positions, the null-text notebook) or 'prompt-to-prompt' (at "
                        f"most 1/16); default {_EDIT.self_max_fraction}")
    p.add_argument("--reweight", nargs="+", metavar="WORD=SCALE",
                   help="scale words' attention and share of the text encoding, e.g. red=1.5")
    p.add_argument("--mode", default=_EDIT.mode, choices=list(EDIT_MODES),
                   help="replace: word swap (same word count); refine: words added or "
                        "removed; auto: by word count (default)")
    p.add_argument("--protect", nargs="+", metavar="PHRASE",
                   help="phrases of the target whose appearance must not change")
    p.add_argument("--leakage", default=None, choices=list(LEAKAGE_MODES),
                   help=f"leakage control for --protect (default: {_EDIT.leakage})")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the inversion's)")
    p.add_argument("--source", metavar="SRC.png", help="also write the reconstruction")
    p.add_argument("--original", metavar="PHOTO|auto", default=None,
                   help="the full-size photo the inversion was made from (or 'auto': the path "
                        "the inversion records): the edit comes back at its size, its pixels "
                        "kept outside the edit's mask")
    p.add_argument("--mask", metavar="MASK.png", default=None,
                   help="where the edit may act: white (or painted, on a transparent layer) "
                        "on black, any size")
    p.add_argument("--mask-mode", default=None, choices=list(MASK_MODES),
                   help="how --mask combines with the automatic blend mask (default: "
                        f"{_EDIT.mask_mode}, the mask alone)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="image to write (several targets: OUT-1.png, ...; or a folder)")
    add_model_args(p)
    p.add_argument("--model-from-inversion", action="store_true",
                   help="load the model the inversion file records (printed first) instead of "
                        "--model; a file received from someone else chooses nothing by default")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser(
        "batch", help="edit many images from a manifest (JSON Lines, YAML or CSV)",
        description="Invert each image of MANIFEST once and apply all its edits. Outputs go to "
                    "OUT/<id>/<n>-<target>.png with OUT/summary.json; a rerun resumes. Exit "
                    "status 1 when an item failed, 2 when the manifest cannot be read.")
    p.add_argument("manifest", metavar="MANIFEST", type=Path, help=".jsonl, .yaml/.yml or .csv")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    add_model_args(p)
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"inversion method for items that do not set one (default: {_INV.method})")
    p.add_argument("--steps", type=int, default=None, help=f"DDIM steps (default: {_INV.steps})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale (default: {_INV.guidance})")
    p.add_argument("--inner-steps", "--num-inner-steps", dest="num_inner_steps", type=int,
                   default=None,
                   help=f"null-text optimisation steps per timestep (default: {_INV.num_inner_steps})")
    p.add_argument("--no-reconstruction", action="store_true",
                   help="do not write OUT/<id>/reconstruction.png")
    p.add_argument("--no-cache", action="store_true", help="do not read or write OUT/.cache")
    p.add_argument("--native", action="store_true",
                   help="write edits at the working (model) size, also for larger images "
                        "(default: at the image's own size)")
    p.add_argument("--min-reconstruction-psnr", type=float, default=None, metavar="DB",
                   help="fail, unedited, items whose reconstruction is below this PSNR (the "
                        "model cannot represent them; a warning is recorded below 20 dB anyway)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the manifest and print the plan; load no model")
    add_engine_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "compare", help="compare inversion methods / edit options on the same edits",
        description="Run images x edits through several configurations (inversion methods x "
                    "leakage modes, plus --config ones) and write OUT/grid.png, OUT/metrics.csv, "
                    "OUT/summary.csv, OUT/summary.md and OUT/raw/.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bench", choices=["shapes"], help="built-in ShapesBench (exact ground truth)")
    src.add_argument("--pie-bench", metavar="DIR",
                     help="PIE-Bench folder (mapping_file.json + annotation_images/)")
    src.add_argument("--manifest", metavar="MANIFEST", help="a batch manifest (.jsonl/.yaml/.csv)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    add_model_args(p, default="shapes", config_flags=("--model-config",))  # --config: below
    p.add_argument("--methods", default=None,
                   help="comma-separated inversion methods (default: ddim,null-text,"
                        "negative-prompt,direct; none when only --config is given)")
    p.add_argument("--leakage", default=None,
                   help="comma-separated leakage modes to cross with the methods, e.g. "
                        "none,replace,project (default: the engine's default)")
    p.add_argument("--config", action="append", metavar="NAME:KEY=VALUE,...",
                   help="an extra configuration, e.g. 'nti-06:method=null-text,cross_replace=0.6' "
                        "(repeatable; keys: inversion options or editor.edit options)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: 50; 20 for --bench shapes)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 7.5)")
    p.add_argument("--inner-steps", "--num-inner-steps", dest="num_inner_steps", type=int,
                   default=None,
                   help="null-text optimisation steps per timestep (default: 10)")
    p.add_argument("--n", type=int, default=3, help="ShapesBench cases per kind (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="ShapesBench seed (default: 0)")
    p.add_argument("--pie-types", default=None,
                   help="PIE-Bench editing_type_id values to keep, comma-separated (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many cases")
    p.add_argument("--mask-convention", choices=["select", "zero"], default=None,
                   help="background metrics over the pixels outside the mask ('select') or over "
                        "the whole image with the mask zeroed as PIE-Bench does ('zero'; default "
                        "for --pie-bench)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write OUT/.cache")
    p.add_argument("--native", action="store_true",
                   help="edit and measure at the working (model) size, also for larger images "
                        "(default: at the image's own size)")
    add_engine_args(p)
    p.set_defaults(func=cmd_compare)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pivot-edit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"{PROG}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
