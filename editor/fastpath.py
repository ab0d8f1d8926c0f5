"""A faster null-text inversion: static buffers, device-side early stop, CUDA graphs.

Why: at batch 1 the null-text loop (Mokady et al. 2022, Algorithm 1) is bound by kernel
launches and host syncs, not arithmetic: one run at SD 1.5 size is about 1 PFLOP, i.e.
about 1.3 s of an H200, yet a plain bf16 loop took 46 s there (docs/speed.md).
The levers are a reduced-precision UNet with the embedding, Adam and the loss kept in
fp32, no host syncs, CUDA graphs (one graph replay per inner step), ``torch.compile``
and batching.

How: :class:`StaticNullText` holds every tensor of the loop in fixed buffers (latent,
timestep, alphas, learning rate, early-stop threshold, embedding, Adam moments, the
``active`` mask, ...) and four step functions that only read and write those buffers:
``pivot`` (one DDIM inversion step), ``cond`` (the conditional prediction), ``inner``
(unconditional forward, DDIM step, per-image loss, gradient to the embedding, masked
Adam, early-stop mask) and ``advance`` (move z-bar with the optimised null). The host
loop only fills buffers (kernel launches, no syncs) and calls the step functions. In
``static-eager`` mode they run as plain PyTorch (any device; this is what the CPU tests
compare with :func:`editor.inversion.null_text_optimization`); in ``cuda-graph`` mode
each is captured once per batch shape (after a few warm-up runs on a side stream) and replayed; ``compile`` runs them on
``torch.compile(unet)``; ``compile+cuda-graph`` captures the compiled UNet's kernels.

Adam: :func:`adam_masked_` is Adam (Kingma & Ba 2015, Algorithm 1) written in tensor ops
with tensor step, learning rate and bias corrections, so it can be captured (no host
reads) and runs on CPU too (``torch.optim.Adam(capturable=True)`` refuses CPU tensors,
which would leave the captured code untested here). It equals ``torch.optim.Adam``
(tested) and keeps stopped images' rows unchanged.

Off on CPU: asking for ``cuda-graph``, ``compile`` or ``compile+cuda-graph`` on another
device raises ``ValueError`` (explicit errors over silent correction); ``"auto"`` picks
``cuda-graph`` on CUDA and the plain loop elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .ddim import alpha_at, ddim_inverse_update, ddim_update, prev_timestep
from .model import _DTYPES
from .options import FAST_MODES

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

MODES = tuple(m for m in FAST_MODES if m != "auto")
_CUDA_ONLY = ("cuda-graph", "compile", "compile+cuda-graph")
STEP_NAMES = ("pivot", "cond", "inner", "advance")


def resolve_sync_every(sync_every: int | None, device: torch.device) -> int:
    """How often the host reads the early-stop mask: every ``k`` inner steps; 0 = never.

    ``None`` picks per device: 1 on CPU (reading a CPU tensor costs nothing, and stopping
    early skips UNet passes), 0 on CUDA. There every read drains the GPU queue while the host
    has nothing queued behind it; with 0 all inner steps run and stopped images are only
    masked (the result is the same, the saved passes are lost). Where early stopping fires
    after a few inner steps (real images), a check every 2-5 steps can be cheaper than 0;
    measure on the machine at hand.
    """
    if sync_every is None:
        return 1 if device.type == "cpu" else 0
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 0:
        raise ValueError(f"sync_every must be None or an integer >= 0, got {sync_every!r}")
    return sync_every


def adam_masked_(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 step: torch.Tensor, lr: torch.Tensor, active: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step (Kingma & Ba 2015, Alg. 1) in place, capturable (no host reads).

    ``step`` and ``lr`` are float64 0-dim tensors (the bias corrections are computed in
    double, as ``torch.optim.Adam`` does on the host); rows of ``param`` (dim 0) whose
    ``active`` is False keep their value (their moments still decay, as with a zero
    gradient in the plain loop, which never reactivates a row within a timestep).
    """
    b1, b2 = betas
    step.add_(1)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    step_size = lr / (1 - torch.pow(b1, step))
    denom = (v.sqrt() / (1 - torch.pow(b2, step)).sqrt()).add_(eps)
    new = param + (-step_size) * m / denom
    keep = active.reshape(-1, *([1] * (param.dim() - 1)))
    param.copy_(torch.where(keep, new, param))


class StaticNullText:
    """Buffers and step functions of null-text inversion for one batch shape.

    The same Python code runs eagerly (``graphs=False``) or is captured into one CUDA graph
    per step function (``graphs=True``). ``capture`` turns a step function into a replay
    callable; the default captures a CUDA graph, tests pass an eager stand-in.
    """

    def __init__(self, unet: torch.nn.Module, sched: Any, *, batch: int,
                 latent_shape: tuple[int, ...], text_shape: tuple[int, ...], guidance: float,
                 early_stop: bool, device: torch.device, unet_dtype: torch.dtype,
                 graphs: bool = False, warmup: int = 3,
                 capture: Callable[[Callable[[], None], int], Callable[[], None]] | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.unet, self.sched, self.dt = unet, sched, unet_dtype
        self.w, self.early_stop, self.device = float(guidance), bool(early_stop), device
        self.batch, self.warmup = batch, warmup
        self.graphs = graphs
        self._capture = capture or self._cuda_graph
        f32 = dict(device=device, dtype=torch.float32)
        f64 = dict(device=device, dtype=torch.float64)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.a_t = torch.ones((), **f32)
        self.a_prev = torch.ones((), **f32)
        self.lr = torch.zeros((), **f64)
        self.thr = torch.zeros((), **f32)
        # latents in the layout the caller's latents have (channels-last VAE output on CPU):
        # the UNet's kernels, hence the last bits, depend on it
        self.z = torch.zeros(batch, *latent_shape, **f32).to(memory_format=memory_format)
        self.e_c = torch.zeros_like(self.z)
        self.target = torch.zeros_like(self.z)
        self.cond = torch.zeros(batch, *text_shape, **f32)
        self.emb = torch.zeros(batch, *text_shape, **f32).requires_grad_(True)
        self.m = torch.zeros(batch, *text_shape, **f32)
        self.v = torch.zeros(batch, *text_shape, **f32)
        self.step = torch.zeros((), **f64)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.used = torch.zeros(batch, dtype=torch.long, device=device)
        self.loss = torch.zeros(batch, **f32)
        self.final_mse = torch.zeros(batch, **f32)
        self._fns = {"pivot": self._pivot, "cond": self._cond, "inner": self._inner,
                     "advance": self._advance}
        self._replay: dict[str, Callable[[], None]] = {}
        self.capture_seconds: dict[str, float] = {}

    # -- buffers -----------------------------------------------------------------------------

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every mutable buffer (what a warm-up may change and must give back)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def set_timestep(self, t: int, steps: int) -> None:
        """Load timestep ``t`` and the alphas of ``t`` and ``t - T/steps`` (fills, no sync)."""
        self.t.fill_(int(t))
        self.a_t.fill_(float(alpha_at(self.sched, t)))
        self.a_prev.fill_(float(alpha_at(self.sched, prev_timestep(self.sched, t, steps))))

    def begin_inner_loop(self, i: int, target: torch.Tensor, early_stop_epsilon: float | None
                         ) -> None:
        """Per-timestep reset of Mokady et al.'s Alg. 1: fresh Adam, lr 1e-2 (1 - i/100),
        threshold eps + 2e-5 i, every image active again, new pivot target."""
        self.target.copy_(target)
        self.lr.fill_(1e-2 * (1.0 - i / 100.0))
        if early_stop_epsilon is not None:
            self.thr.fill_(early_stop_epsilon + i * 2e-5)
        self.m.zero_()
        self.v.zero_()
        self.step.zero_()
        self.active.fill_(True)
        self.used.zero_()

    # -- step functions: read and write buffers only ----------------------------------------

    def _eps(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.dt), self.t, encoder_hidden_states=emb.to(self.dt)).sample.float()

    def _ddim(self, out: torch.Tensor) -> torch.Tensor:
        """DDIM step t -> t - T/steps (Song et al. 2021, eq. 12), as ``ddim.ddim_step``."""
        return ddim_update(self.sched, out, self.z, self.a_t, self.a_prev)

    @torch.no_grad()
    def _pivot(self) -> None:
        """DDIM inversion step (t - T/steps) -> t, as ``ddim.ddim_inverse_step``."""
        out = self._eps(self.z, self.cond)
        self.z.copy_(ddim_inverse_update(self.sched, out, self.z, self.a_t, self.a_prev))

    @torch.no_grad()
    def _cond(self) -> None:
        self.e_c.copy_(self._eps(self.z, self.cond))

    def _inner(self) -> None:
        with torch.enable_grad():
            e_u = self._eps(self.z, self.emb)
            rec = self._ddim(e_u + self.w * (self.e_c - e_u))
            loss = ((rec - self.target) ** 2).mean(dim=(1, 2, 3))  # per image, fp32
            (grad,) = torch.autograd.grad((loss * self.active).sum(), [self.emb])
        with torch.no_grad():
            self.loss.copy_(loss)
            adam_masked_(self.emb, grad, self.m, self.v, self.step, self.lr, self.active)
            self.used.add_(self.active.long())
            if self.early_stop:
                self.active.logical_and_(loss >= self.thr)

    @torch.no_grad()
    def _advance(self) -> None:
        e_u = self._eps(self.z, self.emb)
        z = self._ddim(e_u + self.w * (self.e_c - e_u))
        self.final_mse.copy_(((z - self.target) ** 2).mean(dim=(1, 2, 3)))
        self.z.copy_(z)

    # -- running: eagerly or as graph replays ------------------------------------------------

    def run(self, name: str) -> None:
        """Run step function ``name``; with graphs, capture it on first use."""
        if not self.graphs:
            self._fns[name]()
            return
        if name not in self._replay:
            import time

            saved = {k: v.detach().clone() for k, v in self.buffers().items()}
            t0 = time.perf_counter()
            self._replay[name] = self._capture(self._fns[name], self.warmup)
            self.capture_seconds[name] = time.perf_counter() - t0
            with torch.no_grad():  # warm-up runs changed the buffers: give them back
                for k, v in self.buffers().items():
                    v.copy_(saved[k])
        self._replay[name]()

    def _warming(self, name: str) -> str:
        """A progress-bar note while step ``name`` is still to be captured (paid once)."""
        return " (capturing CUDA graphs, once)" if self.graphs and name not in self._replay else ""

    @staticmethod
    def _cuda_graph(fn: Callable[[], None], warmup: int) -> Callable[[], None]:
        """Warm up on a side stream, then capture ``fn`` as one CUDA graph (its own pool)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    # -- the two loops -------------------------------------------------------------------------

    def pivots(self, z0: torch.Tensor, cond: torch.Tensor, steps: int, *, hook=None,
               progress: bool = True) -> list[torch.Tensor]:
        """DDIM inversion with the conditional prediction only: [z*_0, ..., z*_T]."""
        sched = self.sched
        sched.set_timesteps(steps)
        with torch.no_grad():
            self.cond.copy_(cond)
            self.z.copy_(z0)
        out = [self.z.clone()]
        for i, t in enumerate(tqdm(sched.timesteps.flip(0).tolist(),
                                   desc="DDIM inversion" + self._warming("pivot"),
                                   disable=not progress, leave=False)):
            self.set_timestep(t, steps)
            self.run("pivot")
            out.append(self.z.clone())
            if hook:
                hook(i + 1)
        return out

    def null_text(self, pivots: list[torch.Tensor], cond: torch.Tensor, null: torch.Tensor, *,
                  num_inner_steps: int,
                  early_stop_epsilon: float | None, hook=None, progress: bool = True,
                  sync_every: int | None = None) -> tuple[torch.Tensor, dict]:
        """Null-text optimisation over static buffers; same result as
        :func:`editor.inversion.null_text_optimization` (tested in ``static-eager``)."""
        if (early_stop_epsilon is not None) != self.early_stop:
            raise ValueError("this runner was built for early stopping "
                             f"{'on' if self.early_stop else 'off'}")
        sched = self.sched
        steps = len(pivots) - 1
        sched.set_timesteps(steps)
        check_every = resolve_sync_every(sync_every, self.device) if self.early_stop else 0
        with torch.no_grad():
            self.z.copy_(pivots[-1])
            self.cond.copy_(cond)
            self.emb.copy_(null.float().expand_as(self.emb))
        out, used, final = [], [], []
        for i, t in enumerate(tqdm(sched.timesteps.tolist(),
                                   desc="null-text optimisation" + self._warming("inner"),
                                   disable=not progress, leave=False)):
            self.set_timestep(t, steps)
            self.begin_inner_loop(i, pivots[steps - i - 1], early_stop_epsilon)
            self.run("cond")
            for j in range(num_inner_steps):
                self.run("inner")
                if (check_every and (j + 1) % check_every == 0 and j + 1 < num_inner_steps
                        and not bool(self.active.any())):
                    break  # host sync; images that stopped earlier were masked until here
            out.append(self.emb.detach().clone())
            used.append(self.used.clone())
            self.run("advance")
            final.append(self.final_mse.clone())
            if hook:
                hook(steps + i + 1)
        stats = {"inner_steps": torch.stack(used, 1).tolist(),
                 "final_mse": torch.stack(final, 1).tolist()}
        return torch.stack(out, 0), stats


@dataclass
class FastPath:
    """Options of the fast null-text path; pass it as ``invert(..., fast=FastPath(...))``.

    - ``mode``: ``"static-eager"`` (static buffers run eagerly: any device; the CPU-testable
      twin of the graph path), ``"cuda-graph"``, ``"compile"``, ``"compile+cuda-graph"``.
    - ``dtype``: the UNet's dtype (``"bf16"``, ``"fp16"``, ...; ``None`` keeps the model's).
      The embedding, Adam and the loss stay fp32 (fp16 optimisation diverges).
      A dtype other than the model's, or ``channels_last``, works on a private copy of the
      UNet (memory: one more UNet); load the model in that dtype to avoid the copy.
    - ``compile_options``: keyword arguments of ``torch.compile``.

    The object keeps its prepared UNets and captured graphs, one per model and batch shape:
    reuse it across calls to pay the capture (about 0.1 s) or compilation (minutes) once.
    """

    mode: str = "cuda-graph"
    dtype: torch.dtype | str | None = None
    channels_last: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 3
    _unets: dict[int, torch.nn.Module] = field(default_factory=dict, repr=False, compare=False)
    _runners: dict[tuple, StaticNullText] = field(default_factory=dict, repr=False,
                                                  compare=False)
    #: the fast edit loop's runners (:func:`editor.fastedit.edit_runner`), least recent first
    _edit_runners: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fast mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.dtype, str):
            if self.dtype.lower() not in _DTYPES:
                raise ValueError(f"unknown dtype {self.dtype!r}; use float32, float16 or bfloat16")
            self.dtype = _DTYPES[self.dtype.lower()]
        if self.warmup < 1:
            raise ValueError("warmup must be at least 1 (capture needs a warmed-up step)")

    @property
    def graphs(self) -> bool:
        return self.mode.endswith("cuda-graph")

    def warms_up(self, what: str) -> bool:
        """Whether the next ``"invert"`` or ``"edit"`` through this path pays a warm-up (CUDA
        graph capture or compilation) because none of that kind ran yet: what a progress bar
        says (the first call per shape pays it once)."""
        if not (self.graphs or self.compiled):
            return False
        return not (self._runners if what == "invert" else self._edit_runners)

    @property
    def compiled(self) -> bool:
        return self.mode.startswith("compile")

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (for stats and benchmark output)."""
        return {"mode": self.mode, "dtype": None if self.dtype is None
                else str(self.dtype).removeprefix("torch."), "channels_last": self.channels_last}

    def check_device(self, device: torch.device) -> None:
        if self.mode in _CUDA_ONLY and device.type != "cuda":
            raise ValueError(
                f"fast={self.mode!r} needs a CUDA device; the model is on {device.type}. Use "
                "fast=None (or 'auto', which is off on CPU), or 'static-eager' to test the path")
        if self.dtype == torch.float16 and device.type == "cpu":
            raise ValueError("a float16 UNet is not supported on CPU; use bfloat16")

    def unet_for(self, editor: Model) -> torch.nn.Module:
        """The UNet this path runs: the model's own, a converted copy, compiled or not."""
        base = editor.pipe.unet
        key = id(base)
        if key not in self._unets:
            unet = base
            if (self.dtype is not None and self.dtype != base.dtype) or self.channels_last:
                unet = copy.deepcopy(base).to(dtype=self.dtype or base.dtype)
                if self.channels_last:
                    unet = unet.to(memory_format=torch.channels_last)
                unet.requires_grad_(False).eval()
            if self.compiled:
                unet = torch.compile(unet, **self.compile_options)
            self._unets[key] = unet
        return self._unets[key]

    def runner(self, editor: Model, z0: torch.Tensor, cond: torch.Tensor, *, guidance: float,
               early_stop: bool) -> StaticNullText:
        """The (cached) static runner for this model and the shape of ``z0`` and ``cond``."""
        self.check_device(editor.device)
        sched = editor.scheduler()
        fmt = torch.contiguous_format
        if self.channels_last or (z0.dim() == 4 and not z0.is_contiguous()
                                  and z0.is_contiguous(memory_format=torch.channels_last)):
            fmt = torch.channels_last
        key = (id(editor.pipe.unet), tuple(z0.shape), tuple(cond.shape), float(guidance),
               bool(early_stop), sched.config.prediction_type, str(editor.device), fmt)
        if key not in self._runners:
            dt = self.dtype or editor.pipe.unet.dtype
            self._runners[key] = StaticNullText(
                self.unet_for(editor), sched, batch=int(z0.shape[0]),
                latent_shape=tuple(z0.shape[1:]), text_shape=tuple(cond.shape[1:]),
                guidance=guidance, early_stop=early_stop, device=editor.device, unet_dtype=dt,
                graphs=self.graphs, warmup=self.warmup, memory_format=fmt)
        return self._runners[key]


def resolve_fast(fast: FastPath | str | None, device: torch.device) -> FastPath | None:
    """``None`` | ``"auto"`` | a mode name | a :class:`FastPath` -> a checked FastPath or None.

    ``"auto"`` is ``cuda-graph`` (the model's dtype) on CUDA and the plain loop elsewhere.
    """
    if fast is None:
        return None
    if isinstance(fast, str):
        if fast == "auto":
            return FastPath("cuda-graph") if device.type == "cuda" else None
        fast = FastPath(mode=fast)
    if not isinstance(fast, FastPath):
        raise ValueError(f"fast must be None, 'auto', one of {', '.join(MODES)} or a FastPath, "
                         f"got {type(fast).__name__}")
    fast.check_device(device)
    return fast

