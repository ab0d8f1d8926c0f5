"""Prompt-to-Prompt attention control through diffusers attention processors (Hertz et al. 2022).

- :class:`ControlledAttnProcessor` computes explicit attention probabilities
  (``attn.get_attention_scores``) and hands them to a controller; only the layers
  a controller asks for get it, every other layer keeps its own (SDPA) processor.
- :func:`attention_control` installs the processors for the duration of a
  ``with`` block and restores the originals in ``finally``; it refuses to run
  when no layer was registered.
- :class:`PromptToPrompt` is the controller: it stores cross-attention maps and
  edits the target rows (replace / refine via a token mapper, reweight, self-attention
  injection). :class:`LocalBlend` turns stored maps into a latent mask.

Batch layout (rows of the UNet batch): with classifier-free guidance the first
half is unconditional, the second conditional; controllers act on the conditional
half only. Within a half, row 0 is the source branch and rows ``1..K`` the targets.
The sampling loop sets the current step with :meth:`AttentionController.set_step`;
nothing here counts calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Self-attention injection only on maps with at most this fraction of the latent's
#: positions (the published notebook: 32x32 maps at a 64x64 latent, i.e. 1/4).
SELF_REPLACE_MAX_FRACTION = 0.25


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer: processor name, cross or self, and its map size (h, w)."""

    name: str
    cross: bool
    size: tuple[int, int]

    @property
    def queries(self) -> int:
        return self.size[0] * self.size[1]


def describe_layers(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> dict[str, LayerInfo]:
    """Map every attention processor name of ``unet`` to its :class:`LayerInfo`.

    Map sizes follow the UNet's own structure: ``down_blocks[i]`` works at the latent
    size halved (rounding up, like a stride-2 conv with padding 1) once per earlier
    downsampler, the mid block at the deepest size, ``up_blocks[i]`` mirrors
    ``down_blocks[n-1-i]``. Processors check the query count at call time.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    down_sizes = []
    for block in unet.down_blocks:
        down_sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    n = len(down_sizes)
    out = {}
    for name in unet.attn_processors:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            size = down_sizes[int(parts[1])]
        elif parts[0] == "up_blocks":
            size = down_sizes[n - 1 - int(parts[1])]
        elif parts[0] == "mid_block":
            size = (h, w)
        else:
            raise ValueError(f"attention layer {name!r}: unknown UNet block; cannot size its maps")
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        out[name] = LayerInfo(name, bool(getattr(module, "is_cross_attention", False)), size)
    return out


class AttentionController:
    """Base controller: decides which layers it needs and edits their probabilities.

    ``step`` is set by the sampling loop (:meth:`set_step`) before each UNet call.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.active = True  # False: pass probabilities through untouched (auxiliary UNet calls)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def wants(self, layer: LayerInfo) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, probs: torch.Tensor, layer: LayerInfo, heads: int) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface


class ControlledAttnProcessor:
    """``AttnProcessor`` with explicit probabilities passed through a controller."""

    def __init__(self, controller: AttentionController, layer: LayerInfo) -> None:
        self.controller = controller
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if hidden_states.shape[1] != self.layer.queries:
            raise RuntimeError(
                f"attention layer {self.layer.name}: expected {self.layer.size[0]}x{self.layer.size[1]}"
                f" = {self.layer.queries} queries, got {hidden_states.shape[1]}; the UNet's "
                "structure does not match describe_layers()"
            )
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.controller(probs, self.layer, attn.heads)
        hidden_states = torch.bmm(probs.to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(
    unet: torch.nn.Module, controller: AttentionController, latent_hw: tuple[int, int]
) -> Iterator[list[LayerInfo]]:
    """Install :class:`ControlledAttnProcessor` on the layers ``controller`` wants.

    Yields the registered layers; the UNet's original processors come back in
    ``finally``, also when sampling fails. Raises ``RuntimeError`` when no layer
    was registered (a controller that silently does nothing is a bug).
    """
    originals = dict(unet.attn_processors)
    layers = describe_layers(unet, latent_hw)
    procs, registered = {}, []
    for name, orig in originals.items():
        info = layers[name]
        if controller.wants(info):
            procs[name] = ControlledAttnProcessor(controller, info)
            registered.append(info)
        else:
            procs[name] = orig
    if not registered:
        raise RuntimeError(
            f"attention control registered no layer out of {len(originals)} attention "
            "processors; the controller would silently do nothing"
        )
    unet.set_attn_processor(procs)
    try:
        yield registered
    finally:
        unet.set_attn_processor(originals)


class AttentionStore:
    """Running sums of conditional cross-attention maps, averaged over heads.

    ``sums[(h, w)]`` is ``rows x (h*w) x tokens``: summed over the layers of that
    size and over steps (P2P's ``attention_store``); ``counts`` the number of terms.
    """

    def __init__(self, sizes: set[tuple[int, int]]) -> None:
        self.sizes = set(sizes)
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def add(self, size: tuple[int, int], maps: torch.Tensor) -> None:
        maps = maps.detach().float()
        if size in self.sums:
            self.sums[size] += maps
            self.counts[size] += 1
        else:
            self.sums[size] = maps.clone()
            self.counts[size] = 1

    def average(self, sizes: list[tuple[int, int]] | None = None) -> torch.Tensor | None:
        """Mean map over the given sizes, at the largest of them: ``rows x tokens x h x w``."""
        sizes = [s for s in (sizes or sorted(self.sums)) if s in self.sums]
        if not sizes:
            return None
        top = max(sizes, key=lambda s: s[0] * s[1])
        out = None
        for s in sizes:
            m = self.sums[s] / self.counts[s]  # rows x q x L
            m = m.permute(0, 2, 1).reshape(m.shape[0], m.shape[2], *s)
            if s != top:
                m = F.interpolate(m, size=top, mode="bilinear", align_corners=False)
            out = m if out is None else out + m
        return out / len(sizes)


class PromptToPrompt(AttentionController):
    """P2P controller for one source row and ``K`` target rows (Hertz et al. 2022, sec. 3.2).

    Cross-attention of target ``k``: ``a * (A_src @ M_k) + (1 - a) * A_k`` with
    ``a = cross_alpha[step, k] * token_alpha[k]`` (replace: ``token_alpha = 1``; refine:
    0 on new tokens), then multiplied column-wise by ``equalizer[k]`` (reweight) while
    ``step < reweight_until``. Self-attention of targets is replaced by the source's
    for ``self_window[0] <= step < self_window[1]`` on layers with at most
    ``self_max_queries`` queries. Cross maps of layers whose size is in ``store_sizes``
    are stored (before editing) for local blending and display.
    """

    def __init__(
        self,
        *,
        rows: int,
        mapper: torch.Tensor | None = None,
        token_alpha: torch.Tensor | None = None,
        cross_alpha: torch.Tensor | None = None,
        self_window: tuple[int, int] = (0, 0),
        self_max_queries: int = 0,
        equalizer: torch.Tensor | None = None,
        reweight_until: int = 0,
        store_sizes: set[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError("need at least the source row")
        k = rows - 1
        for name, t, dims, axis in (("mapper", mapper, 3, 0), ("token_alpha", token_alpha, 2, 0),
                                    ("cross_alpha", cross_alpha, 3, 1), ("equalizer", equalizer, 2, 0)):
            if t is not None and (t.ndim != dims or t.shape[axis] != k):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {dims} dims for {k} targets")
        self.rows = rows
        self.mapper = mapper
        self.token_alpha = token_alpha
        self.cross_alpha = cross_alpha
        self.self_window = self_window
        self.self_max_queries = int(self_max_queries)
        self.equalizer = equalizer
        self.reweight_until = int(reweight_until)
        self.store = AttentionStore(store_sizes or set())

    @property
    def edits_cross(self) -> bool:
        return self.rows > 1 and self.mapper is not None

    @property
    def edits_self(self) -> bool:
        return self.rows > 1 and self.self_window[1] > self.self_window[0] and self.self_max_queries > 0

    def wants(self, layer: LayerInfo) -> bool:
        if layer.cross:
            return self.edits_cross or layer.size in self.store.sizes
        return self.edits_self and layer.queries <= self.self_max_queries

    def __call__(self, probs: torch.Tensor, layer: LayerInfo, heads: int) -> torch.Tensor:
        if not self.active:
            return probs
        if self.step is None:
            raise RuntimeError("PromptToPrompt: set_step() was not called before the UNet ran")
        total = probs.shape[0] // heads
        if total < self.rows:
            raise RuntimeError(f"attention batch has {total} rows, the controller expects {self.rows}")
        p = probs.view(total, heads, *probs.shape[1:])
        cond = p[total - self.rows :]  # view: edits write through into probs
        step = self.step
        if layer.cross:
            if layer.size in self.store.sizes:
                self.store.add(layer.size, cond.mean(1))
            if self.edits_cross:
                base, own = cond[0], cond[1:]
                mapped = torch.einsum("hqi,kij->khqj", base, self.mapper.to(base))
                a = self.cross_alpha[min(step, self.cross_alpha.shape[0] - 1)].to(base)
                if self.token_alpha is not None:
                    a = a * self.token_alpha.to(base)
                a = a[:, None, None, :]
                new = a * mapped + (1 - a) * own
                if self.equalizer is not None and step < self.reweight_until:
                    new = new * self.equalizer.to(base)[:, None, None, :]
                cond[1:] = new
        elif self.edits_self and self.self_window[0] <= step < self.self_window[1]:
            if layer.queries <= self.self_max_queries:
                cond[1:] = cond[:1].expand_as(cond[1:])
        return probs


class LocalBlend:
    """Keep everything outside the edited region (P2P local blending, Hertz et al. 2022, sec. 3.3).

    Two sources for the region, both giving ``rows x 1 x h x w`` masks at latent size:

    - ``"attention"`` (the published P2P blend): ``add`` (``rows x tokens``) selects each
      row's words; their stored cross-attention maps (``sizes``) are averaged, max-pooled
      3x3, resized to the latent, normalised by the max and thresholded; the source row's
      mask is united with each target's.
    - ``"noise"`` (DiffEdit's mask, Couairon et al. 2022, sec. 3.1, computed inside the
      edit): the caller passes, for the steps before ``noise_until``, the channel-mean of
      ``|eps(x_src, target prompt) - eps(x_src, source prompt)|`` (both conditional, on
      the source branch's latent); their sum is average-pooled 3x3, normalised by the max
      and thresholded. For models whose word maps do not localise (the bundled one).

    ``subtract`` (attention maps of words, not pooled) is removed from the mask. At steps
    ``>= start``: ``x_k = x_src + mask_k * (x_k - x_src)``.
    """

    def __init__(
        self,
        add: torch.Tensor | None,
        sizes: list[tuple[int, int]],
        *,
        start: int,
        threshold: float = 0.3,
        subtract: torch.Tensor | None = None,
        source: str = "attention",
        noise_until: int = 0,
        noise_threshold: float = 0.4,
    ) -> None:
        if source not in ("attention", "noise"):
            raise ValueError(f"unknown blend mask source {source!r}; use 'attention' or 'noise'")
        if source == "attention" and (add is None or not sizes):
            raise ValueError("attention blending needs words and at least one stored map size")
        if source == "noise" and noise_until < 1:
            raise ValueError("noise blending needs at least one step to estimate its mask")
        self.add, self.subtract = add, subtract
        self.sizes = list(sizes)
        self.start = int(start)
        self.threshold = float(threshold)
        self.source = source
        self.noise_until = int(noise_until)
        self.noise_threshold = float(noise_threshold)
        self.noise: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def wants_noise(self, step: int) -> bool:
        return self.source == "noise" and step < self.noise_until

    def observe(self, eps_source: torch.Tensor, eps_targets: torch.Tensor, step: int) -> None:
        """Accumulate ``|eps_targets - eps_source|`` (channel mean; ``1`` and ``K x C x h x w``)."""
        if not self.wants_noise(step):
            return
        d = (eps_targets.float() - eps_source.float()).abs().mean(1, keepdim=True)
        d = torch.cat([torch.zeros_like(d[:1]), d])  # the source row: no difference
        self.noise = d if self.noise is None else self.noise + d

    def mask(self, store: AttentionStore, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """Boolean mask ``rows x 1 x h x w`` at latent size (None before anything was observed)."""
        # word maps: the attention mask's source, and the noise mask's subtract words only
        need_maps = self.source == "attention" or self.subtract is not None
        maps = store.average(self.sizes) if need_maps and self.sizes else None
        if self.source == "noise":
            if self.noise is None:
                return None
            m = F.interpolate(self._pooled_noise(), size=tuple(latent_hw), mode="bilinear",
                              align_corners=False)
            m = self._threshold(m, self.noise_threshold)
            # a target whose prompt equals the source's (e.g. reweight only) has no
            # difference map: leave it unblended rather than erase its edit
            m[self._no_difference()] = True
            m[0] = False  # the source row keeps itself
        else:
            if maps is None:
                return None
            m = self._mask(maps, self.add, latent_hw, pool=True)
        if self.subtract is not None and maps is not None:
            m = m & ~self._mask(maps, self.subtract, latent_hw, pool=False)
        return m

    def _pooled_noise(self) -> torch.Tensor:
        """The accumulated difference map, average-pooled 3x3 (``rows x 1 x h x w``)."""
        return F.avg_pool2d(self.noise, 3, stride=1, padding=1, count_include_pad=False)

    def _no_difference(self) -> torch.Tensor:
        """Rows whose target prompt made no difference at all (``rows`` booleans)."""
        return self.noise.amax(dim=(1, 2, 3)) == 0

    @staticmethod
    def _normalise(m: torch.Tensor) -> torch.Tensor:
        """Each map divided by its max (all-zero maps stay zero)."""
        mx = m.amax(dim=(2, 3), keepdim=True)
        return torch.where(mx > 0, m / mx.clamp_min(1e-12), torch.zeros_like(m))

    @classmethod
    def _threshold(cls, m: torch.Tensor, th: float) -> torch.Tensor:
        return cls._normalise(m) > th

    def _mask(self, maps: torch.Tensor, weights: torch.Tensor, hw: tuple[int, int], pool: bool) -> torch.Tensor:
        w = weights.to(maps)[:, :, None, None]
        m = (maps * w).sum(1, keepdim=True)  # rows x 1 x h x w
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=tuple(hw), mode="nearest")
        m = self._threshold(m, self.threshold)
        return m[:1] | m

    def pixel_mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """Mask at image size (``rows x h x w`` in [0, 1]) for compositing decoded images.

        Noise masks: the normalised difference map resized bilinearly, then thresholded
        (a sharper outline than the latent grid); attention masks: the last latent mask
        resized bilinearly.
        """
        if self.last_mask is None:
            return None
        if self.source == "noise" and self.noise is not None:
            m = F.interpolate(self._normalise(self._pooled_noise()), size=tuple(size),
                              mode="bilinear", align_corners=False)
            m = (m > self.noise_threshold).float()
            m[self._no_difference()] = 1.0
            if self.subtract is not None:  # keep the subtracted region out, as in the latent mask
                keep = F.interpolate(self.last_mask.float(), size=tuple(size), mode="bilinear",
                                     align_corners=False)
                m = torch.minimum(m, (keep > 0).float())
        else:
            m = F.interpolate(self.last_mask.float(), size=tuple(size), mode="bilinear",
                              align_corners=False)
        m[0] = 0.0
        return m[:, 0].clamp(0, 1)

    def __call__(self, latents: torch.Tensor, store: AttentionStore, step: int) -> torch.Tensor:
        if step < self.start:
            return latents
        mask = self.mask(store, tuple(latents.shape[-2:]))
        if mask is None:
            return latents
        self.last_mask = mask
        src = latents[:1]
        return src + mask.to(latents.dtype) * (latents - src)
