"""A faster Prompt-to-Prompt edit: the two-branch sampling loop in static buffers, captured
as one CUDA graph per step shape.

Why: an edit is ``steps`` guided UNet calls on ``2 (K + 1)`` rows (the source and ``K``
targets, unconditional and conditional), a few more for the noise mask, and per call the
controller's work on every controlled attention layer and the blend's: thousands of small
kernels per step. On the H200 one eager edit took 3.3 s at 50 steps (docs/speed.md), most of
it launching kernels; replaying one CUDA graph per step removes the launches.

How: :class:`StaticEdit` holds every tensor the loop reads or writes in fixed buffers (the
latents, the timestep and its alphas, the step's null embedding, the text encodings, the
offsets of direct inversion, the controller's constants and per-step weights, the attention
store, the noise accumulator, the last mask) and one step function per *step shape*: whether
the step feeds the noise mask (``i < noise_until``) and whether it blends (``i >= start``),
so at most four. The host fills the buffers (kernel launches and device-to-device copies, no
syncs), picks the step shape and runs it: eagerly in ``static-eager`` mode (any device; the
CPU tests check it equals :func:`editor.sampling.denoise` bit for bit), as a captured CUDA
graph replay in ``cuda-graph`` mode (captured once per shape on the first use, after warm-up
runs whose changes to the buffers are undone), with ``torch.compile(unet)`` in the compile
modes. Selected like the inversion's fast path: ``EditOptions(fast=...)`` / the same
:class:`~editor.fastpath.FastPath` object, which keeps the runners (graphs) per edit
signature, so a second edit of the same shape replays what the first captured.

What had to change for capture (each breaks a capture or makes a replay wrong):

- the controller's Python ``step``: the step's injection weights (``K x L``) and the
  self-attention flag (a 0-dim bool) are buffers the host fills before each step
  (:class:`StaticPromptToPrompt`); self-attention injection is a ``torch.where`` instead
  of a Python ``if`` (:meth:`editor.attention.PromptToPrompt._inject_self`);
- the attention store grew a new tensor on its first add and counted adds in Python: here
  its sums are preallocated and added in place, and the counts are kept by the host (a
  captured ``+= 1`` runs once, at capture) and handed to the blend as 0-dim tensors
  (:class:`StaticStore`);
- the blend rebound ``self.noise`` every step and marked the "no difference" rows by
  boolean indexing (a host read): the noise sum is a buffer added in place, the rows are
  marked with ``|`` (:mod:`editor.blending`, also in the eager loop, same masks), and the
  last mask is copied into a buffer;
- per-step inputs come from device tables (null embeddings, offsets) or ``fill_`` with a
  host number (timestep, alphas): no host-to-device copy of a pageable tensor inside a
  step; the controller's and blend's constants (mapper, token weights, equalizer, blend
  words, user masks) are moved to the device once.

The step rules (noise steps, blend start, self-attention window) are host decisions on the
step index, never on tensor values, so nothing reads the device during the loop.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .attention import (
    AttentionStore,
    PromptToPrompt,
    StoreKey,
    attention_control,
    describe_layers,
    store_key,
)
from .blending import LocalBlend
from .ddim import alpha_at, ddim_update, prev_timestep
from .fastpath import FastPath, StaticNullText
from .model import Cond, as_cond
from .progress import Callback, StepHook
from .sampling import check_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from .inversion import Inversion
    from .model import Model

__all__ = ["StaticStore", "StaticPromptToPrompt", "StaticEdit", "edit_runner", "fast_denoise",
           "MAX_EDIT_RUNNERS"]

#: Edit runners (each with its graphs) a :class:`FastPath` keeps; the oldest goes first.
MAX_EDIT_RUNNERS = 4


def _opt(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device).clone()


def _load(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None:
        dst.copy_(src)


class StaticStore(AttentionStore):
    """An :class:`~editor.attention.AttentionStore` with preallocated sums (added in place)
    and the counts as host integers plus 0-dim tensors the host fills before each step."""

    def __init__(self, shapes: dict[StoreKey, tuple[int, ...]], device: torch.device) -> None:
        super().__init__(set(shapes))
        self.sums = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
        self.counts = {k: 0 for k in shapes}
        self.n = {k: torch.zeros((), device=device) for k in shapes}

    def add(self, key: StoreKey, maps: torch.Tensor) -> None:
        self.sums[key].add_(maps.detach().float())

    def _count(self, key: StoreKey) -> torch.Tensor:
        return self.n[key]

    def reset(self) -> None:
        for k in self.sums:
            self.sums[k].zero_()
            self.counts[k] = 0
            self.n[k].zero_()

    def advance(self, per_call: dict[StoreKey, int]) -> None:
        """Count the adds of one UNet call ahead of the step (the blend reads the counts
        after this step's call)."""
        for k, n in per_call.items():
            self.counts[k] += n
            self.n[k].fill_(self.counts[k])

    def to_plain(self) -> AttentionStore:
        """An ordinary store with copies of the sums (what :func:`editor.editing.collect`
        reads)."""
        out = AttentionStore(self.keys)
        for k, s in self.sums.items():
            if self.counts[k]:
                out.sums[k] = s.clone()
                out.counts[k] = self.counts[k]
        return out


class StaticPromptToPrompt(PromptToPrompt):
    """:class:`~editor.attention.PromptToPrompt` whose step-dependent parts are buffers:
    the step's cross-attention injection weights and the self-attention flag."""

    def __init__(self, like: PromptToPrompt, store: StaticStore, device: torch.device) -> None:
        super().__init__(rows=like.rows, mapper=_opt(like.mapper, device),
                         token_alpha=_opt(like.token_alpha, device),
                         cross_alpha=_opt(like.cross_alpha, device),
                         self_window=like.self_window, self_max_queries=like.self_max_queries,
                         equalizer=_opt(like.equalizer, device))
        self.store = store
        self.alpha_now = (None if self.cross_alpha is None
                          else torch.zeros(self.cross_alpha.shape[1:], device=device))
        self.self_on = torch.zeros((), dtype=torch.bool, device=device)

    def load(self, like: PromptToPrompt) -> None:
        """This edit's values (same shapes as the runner was built for)."""
        for name in ("mapper", "token_alpha", "cross_alpha", "equalizer"):
            _load(getattr(self, name), getattr(like, name))
        self.self_window = like.self_window

    def set_step(self, step: int) -> None:
        # the step goes to the buffers only: ``self.step`` stays 0, so that a compiled UNet
        # (torch.compile guards on the Python values it reads) is not recompiled per step
        self.step = 0
        if self.alpha_now is not None:
            self.alpha_now.copy_(self.cross_alpha[min(step, self.cross_alpha.shape[0] - 1)])
        self.self_on.fill_(self.self_window[0] <= step < self.self_window[1])

    def _cross_alpha_now(self, step: int) -> torch.Tensor:
        return self.alpha_now

    def _inject_self(self, cond: torch.Tensor, step: int) -> None:
        cond[1:] = torch.where(self.self_on, cond[:1].expand_as(cond[1:]), cond[1:])


def _controller_signature(c: PromptToPrompt) -> tuple:
    def shape(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else tuple(t.shape)

    return (c.rows, shape(c.mapper), shape(c.token_alpha), shape(c.cross_alpha),
            shape(c.equalizer), c.self_max_queries, c.edits_self, tuple(sorted(c.store.keys)))


def _blend_signature(b: LocalBlend | None) -> tuple | None:
    if b is None:
        return None
    return (b.source, b.threshold, b.noise_threshold, b.start, b.noise_until, tuple(b.keys),
            None if b.add is None else tuple(b.add.shape),
            None if b.subtract is None else tuple(b.subtract.shape),
            None if b.user is None else (tuple(b.user[0].shape), tuple(b.user[1].shape)),
            b.user_mode)


class StaticEdit:
    """Buffers and step functions of the two-branch P2P sampling loop for one edit shape.

    ``capture(fn, warmup)`` turns a step function into a replay callable (default: a CUDA
    graph, as :class:`~editor.fastpath.StaticNullText`); tests pass an eager stand-in.
    """

    def __init__(self, unet: torch.nn.Module, sched: Any, *, rows: int,
                 latent_shape: tuple[int, ...], text_shape: tuple[int, ...], guidance: float,
                 steps: int, timesteps: list[int], device: torch.device,
                 unet_dtype: torch.dtype, controller: PromptToPrompt,
                 blend: LocalBlend | None, offsets: bool, graphs: bool = False,
                 warmup: int = 3,
                 capture: Callable[[Callable[[], None], int], Callable[[], None]] | None = None
                 ) -> None:
        self.unet, self.sched, self.dt, self.device = unet, sched, unet_dtype, device
        self.rows, self.w, self.steps = int(rows), float(guidance), int(steps)
        self.timesteps = [int(t) for t in timesteps]
        self.graphs, self.warmup = graphs, warmup
        self._capture = capture or StaticNullText._cuda_graph
        f32 = dict(device=device, dtype=torch.float32)
        self.hw = (int(latent_shape[-2]), int(latent_shape[-1]))
        self.lat = torch.zeros(rows, *latent_shape, **f32)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.a_t = torch.ones((), **f32)
        self.a_prev = torch.ones((), **f32)
        self.null = torch.zeros(rows, *text_shape, **f32)
        self.emb = torch.zeros(rows, *text_shape, **f32)
        self.off = torch.zeros(1, *latent_shape, **f32) if offsets else None
        # the store: one running sum per key, of the cross layers the store wants
        layers = describe_layers(unet, self.hw).values()
        want = [la for la in layers if controller.store.wants(la)]
        self.per_call = dict(Counter(store_key(la) for la in want))
        shapes = {k: (rows, k[0] * k[1], int(text_shape[0])) for k in self.per_call}
        self.store = StaticStore(shapes, device)
        self.ctrl = StaticPromptToPrompt(controller, self.store, device)
        self.blend = None if blend is None else copy.copy(blend)
        self.noise = None
        if self.blend is not None:  # private copies of its constants, on the device
            b = self.blend
            b.add, b.subtract = _opt(b.add, device), _opt(b.subtract, device)
            if b.user is not None:
                b.user = (_opt(b.user[0], device), _opt(b.user[1], device))
            self.blend.last_mask = None
            if self.blend.source == "noise":
                self.noise = torch.zeros(rows, 1, *self.hw, **f32)
            self.blend.noise = self.noise
        self.last_mask = torch.zeros(rows, 1, *self.hw, dtype=torch.bool, device=device)
        self._replay: dict[tuple[bool, bool], Callable[[], None]] = {}
        self.capture_seconds: dict[str, float] = {}
        self._procs: dict[str, Any] | None = None

    # -- buffers -----------------------------------------------------------------------------

    def buffers(self) -> dict[str, torch.Tensor]:
        """What a step writes (and a warm-up must give back)."""
        out = {"lat": self.lat, "last_mask": self.last_mask}
        if self.noise is not None:
            out["noise"] = self.noise
        out.update({f"sum{k}": v for k, v in self.store.sums.items()})
        return out

    def load(self, inversion: Inversion, emb: torch.Tensor, controller: PromptToPrompt,
             blend: LocalBlend | None) -> None:
        """This edit's inputs into the buffers; the running sums zeroed."""
        dev = self.device
        with torch.no_grad():
            self.lat.copy_(inversion.z_T.to(dev).float().expand(self.rows, -1, -1, -1))
            self.emb.copy_(emb.to(dev).float())
            self.ctrl.load(controller)
            self.store.reset()
            if self.blend is not None:
                b = self.blend
                _load(b.add, blend.add)
                _load(b.subtract, blend.subtract)
                if b.user is not None:
                    b.user[0].copy_(blend.user[0])
                    b.user[1].copy_(blend.user[1])
            if self.noise is not None:
                self.noise.zero_()
            self.last_mask.zero_()

    # -- the step function --------------------------------------------------------------------

    def _eps(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """As :meth:`editor.model.Model.eps`, on this runner's UNet and timestep buffer."""
        return self.unet(x.to(self.dt), self.t, encoder_hidden_states=emb.to(self.dt)).sample.float()

    def step_fn(self, noise: bool, blend: bool) -> Callable[[], None]:
        """One sampling step of :func:`editor.sampling.denoise` on the buffers."""
        rows = self.rows

        @torch.no_grad()
        def step() -> None:
            lat = self.lat
            e_u, e_c = self._eps(torch.cat([lat, lat]), torch.cat([self.null, self.emb])).chunk(2)
            if noise:  # DiffEdit-style: the target prompts on the source branch's latent
                self.ctrl.active = False
                try:
                    e_tgt = self._eps(lat[:1].expand(rows - 1, -1, -1, -1), self.emb[1:])
                finally:
                    self.ctrl.active = True
                self.noise.add_(LocalBlend.difference(e_c[:1], e_tgt))
            new = ddim_update(self.sched, e_u + self.w * (e_c - e_u), lat, self.a_t, self.a_prev)
            if self.off is not None:
                new[:1] = new[:1] + self.off
            if blend:
                mask = self.blend.mask(self.store, self.hw, rows=rows)
                if mask is None:  # pragma: no cover - the rules above make this impossible
                    raise RuntimeError("the blend has no mask at a blending step")
                self.last_mask.copy_(mask)
                src = new[:1]
                new = src + mask.to(new.dtype) * (new - src)
            lat.copy_(new)

        step.__name__ = f"step{'_noise' if noise else ''}{'_blend' if blend else ''}"
        return step

    def run(self, noise: bool, blend: bool) -> None:
        """Run the step of this shape; with graphs, capture it on first use."""
        kind = (bool(noise), bool(blend))
        if not self.graphs:
            self.step_fn(*kind)()
            return
        if kind not in self._replay:
            fn = self.step_fn(*kind)
            saved = {k: v.detach().clone() for k, v in self.buffers().items()}
            t0 = time.perf_counter()
            self._replay[kind] = self._capture(fn, self.warmup)
            self.capture_seconds[fn.__name__] = time.perf_counter() - t0
            with torch.no_grad():  # warm-up runs changed the buffers: give them back
                for k, v in self.buffers().items():
                    v.copy_(saved[k])
        self._replay[kind]()

    def kind(self, i: int) -> tuple[bool, bool]:
        b = self.blend
        return (b is not None and b.wants_noise(i), b is not None and i >= b.start)

    # -- the loop ------------------------------------------------------------------------------

    @contextmanager
    def _controlled(self) -> Iterator[None]:
        """:func:`editor.attention.attention_control` with this runner's processors, made
        once and installed again on every edit (new processor objects would make a compiled
        UNet recompile)."""
        if self._procs is None:
            with attention_control(self.unet, self.ctrl, self.hw):
                self._procs = dict(self.unet.attn_processors)
        originals = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(dict(self._procs))  # (diffusers pops from the dict)
        try:
            yield
        finally:
            self.unet.set_attn_processor(originals)

    def sample(self, inversion: Inversion, emb: torch.Tensor, controller: PromptToPrompt,
               blend: LocalBlend | None, *, callback: Callback | None = None,
               progress: bool = True, desc: str = "editing") -> torch.Tensor:
        """The edit's final latents; ``controller.store`` and ``blend`` (``noise``,
        ``last_mask``) are left as :func:`editor.sampling.denoise` leaves them."""
        dev, steps, rows = self.device, self.steps, self.rows
        self.load(inversion, emb, controller, blend)
        uncond = inversion.uncond.to(dev).float()
        offsets = None if inversion.offsets is None else inversion.offsets.to(dev).float()
        alphas = [(float(alpha_at(self.sched, t)),
                   float(alpha_at(self.sched, prev_timestep(self.sched, t, steps))))
                  for t in self.timesteps]
        hook = StepHook(callback, steps, "edit" if rows > 1 else "sampling")
        blended = False
        pending = {self.kind(i) for i in range(steps)} - set(self._replay) if self.graphs else set()
        bar = tqdm(self.timesteps, desc=desc + (" (capturing CUDA graphs, once)" if pending
                                                else ""), disable=not progress, leave=False)
        with self._controlled():
            for i, t in enumerate(bar):
                self.ctrl.set_step(i)
                self.store.advance(self.per_call)
                self.t.fill_(t)
                self.a_t.fill_(alphas[i][0])
                self.a_prev.fill_(alphas[i][1])
                self.null.copy_(uncond[min(i, uncond.shape[0] - 1)].expand_as(self.null))
                if self.off is not None:
                    self.off.copy_(offsets[i].reshape_as(self.off))
                kind = self.kind(i)
                self.run(*kind)
                blended = blended or kind[1]
                if pending and pending <= set(self._replay):
                    bar.set_description(desc)
                    pending = set()
                hook(i + 1)
        controller.store = self.store.to_plain()
        if blend is not None:
            if self.noise is not None:
                blend.noise = self.noise.clone()
            if blended:
                blend.last_mask = self.last_mask.clone()
        return self.lat.clone()


def edit_runner(fast: FastPath, model: Model, inversion: Inversion, emb: torch.Tensor,
                controller: PromptToPrompt, blend: LocalBlend | None, guidance: float
                ) -> StaticEdit:
    """The (cached) runner for this edit's shape: one per signature (rows, shapes, guidance,
    the controller's and the blend's structure, thresholds), at most
    :data:`MAX_EDIT_RUNNERS` per :class:`FastPath`, the least recently used dropped."""
    fast.check_device(model.device)
    sched = model.scheduler()
    sched.set_timesteps(inversion.steps)
    unet = fast.unet_for(model)
    key = (id(model.pipe.unet), model.pipe.unet.dtype, int(emb.shape[0]), tuple(inversion.z_T.shape[1:]),
           tuple(emb.shape[1:]), float(guidance), inversion.steps, tuple(inversion.timesteps),
           inversion.offsets is not None, sched.config.prediction_type, str(model.device),
           _controller_signature(controller), _blend_signature(blend))
    runners = fast._edit_runners
    if key in runners:
        runners[key] = runners.pop(key)  # most recently used last
        return runners[key]
    while len(runners) >= MAX_EDIT_RUNNERS:
        runners.pop(next(iter(runners)))
    runners[key] = StaticEdit(
        unet, sched, rows=int(emb.shape[0]), latent_shape=tuple(inversion.z_T.shape[1:]),
        text_shape=tuple(emb.shape[1:]), guidance=guidance, steps=inversion.steps,
        timesteps=list(inversion.timesteps), device=model.device,
        unet_dtype=fast.dtype or model.pipe.unet.dtype, controller=controller, blend=blend,
        offsets=inversion.offsets is not None, graphs=fast.graphs, warmup=fast.warmup)
    return runners[key]


def fast_denoise(model: Model, inversion: Inversion, emb: torch.Tensor | Cond, *,
                 fast: FastPath, guidance: float, controller: PromptToPrompt,
                 blend: LocalBlend | None, callback: Callback | None = None,
                 progress: bool = True, desc: str = "editing") -> torch.Tensor:
    """:func:`editor.sampling.denoise` of an edit through ``fast``'s static loop.

    SD 1.x / 2.x UNets only: an SDXL UNet's added conditioning (pooled rows, time ids) is not
    in the buffers yet, so an SDXL edit is refused here (the facade maps ``"auto"`` to the
    eager loop for SDXL)."""
    if model.is_sdxl or (isinstance(emb, Cond) and emb.pooled is not None):
        raise ValueError(f"fast={fast.mode!r}: the fast edit loop runs SD 1.x/2.x UNets only "
                         "(not SDXL's added conditioning yet); use fast=None or 'auto'")
    check_timesteps(model, inversion)
    emb = as_cond(emb).tokens
    runner = edit_runner(fast, model, inversion, emb, controller, blend, guidance)
    return runner.sample(inversion, emb, controller, blend, callback=callback,
                         progress=progress, desc=desc)
