"""Prompt-to-Prompt attention control through diffusers attention processors (Hertz et al. 2022).

- :class:`ControlledAttnProcessor` computes explicit attention probabilities
  (``attn.get_attention_scores``) and hands them to a controller; only the layers
  a controller asks for get it, every other layer keeps its own (SDPA) processor.
- :func:`attention_control` installs the processors for the duration of a
  ``with`` block and restores the originals in ``finally``; it refuses to run
  when no layer was registered.
- :class:`PromptToPrompt` is the controller: it stores cross-attention maps and
  edits the target rows (replace / refine via a token mapper, reweight, self-attention
  injection). Local blending (:mod:`editor.blending`) reads the stored maps.

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


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer: processor name, cross or self, and its map size (h, w)."""

    name: str
    cross: bool
    size: tuple[int, int]

    @property
    def queries(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def mid(self) -> bool:
        """Whether the layer is in the UNet's mid block."""
        return self.name.startswith("mid_block")


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


StoreKey = tuple[int, int, bool]  # (h, w, mid block?)


def store_key(layer: LayerInfo) -> StoreKey:
    """Which running sum a cross-attention layer's maps go to: its size, and whether it is
    the UNet's mid block (P2P's local blend reads the down and up blocks' maps only)."""
    return (layer.size[0], layer.size[1], layer.mid)


class AttentionStore:
    """Running sums of conditional cross-attention maps, averaged over heads.

    ``sums[key]`` is ``rows x (h*w) x tokens``, summed over the layers with that
    :func:`store_key` and over steps (P2P's ``attention_store``); ``counts`` the number of
    terms. Maps are stored as the controller leaves them, i.e. after injection (the
    published controller edits the stored tensor in place).
    """

    def __init__(self, keys: set[StoreKey]) -> None:
        self.keys = set(keys)
        self.sums: dict[StoreKey, torch.Tensor] = {}
        self.counts: dict[StoreKey, int] = {}

    def wants(self, layer: LayerInfo) -> bool:
        return layer.cross and store_key(layer) in self.keys

    def add(self, key: StoreKey, maps: torch.Tensor) -> None:
        maps = maps.detach().float()
        if key in self.sums:
            self.sums[key] += maps
            self.counts[key] += 1
        else:
            self.sums[key] = maps.clone()
            self.counts[key] = 1

    def _count(self, key: StoreKey) -> int | torch.Tensor:
        """The number of maps summed under ``key`` (a tensor in the static store)."""
        return self.counts[key]

    def average(self, keys: list[StoreKey] | None = None) -> torch.Tensor | None:
        """Mean map over the given keys, at the largest of their sizes: ``rows x tokens x h x w``."""
        keys = [k for k in (keys or sorted(self.sums)) if k in self.sums]
        if not keys:
            return None
        top = max((k[:2] for k in keys), key=lambda s: s[0] * s[1])
        out = None
        for k in keys:
            m = self.sums[k] / self._count(k)  # rows x q x L
            m = m.permute(0, 2, 1).reshape(m.shape[0], m.shape[2], k[0], k[1])
            if k[:2] != top:
                m = F.interpolate(m, size=top, mode="bilinear", align_corners=False)
            out = m if out is None else out + m
        return out / len(keys)


class PromptToPrompt(AttentionController):
    """P2P controller for one source row and ``K`` target rows (Hertz et al. 2022, sec. 3.2),
    as the published controllers compute it (``AttentionReplace`` / ``AttentionRefine`` /
    ``AttentionReweight`` of the null-text notebook).

    Cross-attention of target ``k`` at step ``i``, with ``a = cross_alpha[i, k]`` (the
    injection window per token), ``t = token_alpha[k]`` (refine: 0 on new tokens; replace:
    1) and ``e = equalizer[k]`` (reweight; 1 elsewhere)::

        R = (A_src @ M_k) * t + A_k * (1 - t)          # replace / refine
        A_k <- (R * e) * a + (1 - a) * A_k              # reweight scales the injected part

    Self-attention of targets is replaced by the source's for
    ``self_window[0] <= i < self_window[1]`` on layers with at most ``self_max_queries``
    queries. Cross maps of the layers ``store`` wants are stored after the edit (for local
    blending and display).
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
        store_keys: set[StoreKey] | None = None,
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
        self.store = AttentionStore(store_keys or set())

    @property
    def edits_cross(self) -> bool:
        return self.rows > 1 and self.mapper is not None

    @property
    def edits_self(self) -> bool:
        return self.rows > 1 and self.self_window[1] > self.self_window[0] and self.self_max_queries > 0

    def wants(self, layer: LayerInfo) -> bool:
        if layer.cross:
            return self.edits_cross or self.store.wants(layer)
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
            if self.edits_cross:
                base, own = cond[0], cond[1:]
                mapped = torch.einsum("hqi,kij->khqj", base, self.mapper.to(base))
                if self.token_alpha is not None:
                    t = self.token_alpha.to(base)[:, None, None, :]
                    mapped = mapped * t + own * (1 - t)
                if self.equalizer is not None:
                    mapped = mapped * self.equalizer.to(base)[:, None, None, :]
                a = self._cross_alpha_now(step).to(base)
                a = a[:, None, None, :]
                cond[1:] = mapped * a + (1 - a) * own
            if self.store.wants(layer):
                self.store.add(store_key(layer), cond.mean(1))
        elif self.edits_self and layer.queries <= self.self_max_queries:
            self._inject_self(cond, step)
        return probs

    # the two step-dependent parts, overridden by the static controller of the fast edit
    # loop (:mod:`editor.fastedit`), which reads them from buffers the host fills per step

    def _cross_alpha_now(self, step: int) -> torch.Tensor:
        """``K x L`` cross-attention injection weights of step ``step``."""
        return self.cross_alpha[min(step, self.cross_alpha.shape[0] - 1)]

    def _inject_self(self, cond: torch.Tensor, step: int) -> None:
        """Targets take the source's self-attention inside the window."""
        if self.self_window[0] <= step < self.self_window[1]:
            cond[1:] = cond[:1].expand_as(cond[1:])
