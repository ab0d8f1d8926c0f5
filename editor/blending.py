"""Local blending: keep everything outside the edited region (Hertz et al. 2022, sec. 3.3).

- :class:`LocalBlend` turns the stored cross-attention maps of chosen words (the published
  P2P blend) or a DiffEdit-style prediction difference (Couairon et al. 2022) into a
  latent mask per row, and blends ``x_k = x_src + mask_k (x_k - x_src)``.
- :func:`blend_keys` picks the cross-attention maps the blend averages (P2P's rule by
  default: the down and up blocks' maps at their coarsest size).
- :func:`make_blend` builds the blend an :class:`editor.plan.EditPlan` asks for.
- :func:`composite` blends decoded images with the mask at pixel size (the bundled
  VAE's decoder lets edited latents re-colour the whole background).

Why the bundled model defaults to the noise mask: its per-word cross-attention maps do
not localise (its conditional branch reads ~80% of its attention from the end and
padding rows), so the edited region is taken from ``|eps(x_src, target) - eps(x_src,
source)|`` over the first 20% of the steps, thresholded at 0.5 of its max
(``docs/methods.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .attention import AttentionStore, LayerInfo, StoreKey, store_key

if TYPE_CHECKING:  # pragma: no cover
    from .plan import EditPlan

#: ``blend_maps="half"`` reads cross-attention maps whose side is at least this fraction of
#: the latent's side (bundled model, 16x16 latent: the 16x16 and 8x8 maps).
BLEND_MIN_FRACTION = 0.5
#: Noise-difference masks are estimated over this fraction of the first steps.
NOISE_MASK_STEPS = 0.2


def blend_keys(layers: list[LayerInfo], latent_hw: tuple[int, int], rule: str = "published",
               min_fraction: float = BLEND_MIN_FRACTION) -> list[StoreKey]:
    """The stored cross-attention maps a blend (or the displayed maps) average.

    - ``"published"``: the down and up blocks' maps at their coarsest size, as P2P's
      ``LocalBlend`` (``attention_store["down_cross"][2:4] + ["up_cross"][:3]``, the five
      16x16 maps of SD 1.5 at 512 px; never the mid block's); the bundled model: its 8x8.
    - ``"half"``: every map whose side is at least ``min_fraction`` of the latent's (at
      least the largest one); the bundled model: 16x16 and 8x8; SD 1.5: 64x64 and 32x32.
    """
    cross = [la for la in layers if la.cross]
    if not cross:
        raise ValueError("the UNet has no cross-attention layers; Prompt-to-Prompt cannot edit it")
    keys = sorted({store_key(la) for la in cross}, key=lambda k: -k[0] * k[1])
    if rule == "published":
        outer = [k for k in keys if not k[2]] or keys
        return [min(outer, key=lambda k: k[0] * k[1])]
    if rule == "half":
        keep = [k for k in keys if min(k[0] / latent_hw[0], k[1] / latent_hw[1]) >= min_fraction]
        return keep or keys[:1]
    raise ValueError(f"unknown blend_maps rule {rule!r}; use 'published' or 'half'")


def make_blend(plan: EditPlan, keys: list[StoreKey], steps: int,
               user: tuple[torch.Tensor, torch.Tensor] | None = None) -> LocalBlend | None:
    """The local blend ``plan`` asks for (``None``: blending off, or no word to blend), and
    the user's mask (``user``: latent-size bool, image-size 0/1) combined by
    ``options.mask_mode``. Blending starts at step ``int(blend_start * steps)``, as
    published."""
    o = plan.options
    sub = plan.sub if o.blend_subtract else None
    start = int(o.blend_start * steps)
    mode = o.mask_mode
    if user is not None and (mode == "user" or plan.mask_source is None):
        return LocalBlend(None, keys, start=start, source="user", user=user)
    if plan.mask_source == "noise":
        return LocalBlend(None, keys, start=start, subtract=sub, source="noise",
                          noise_until=max(1, int(round(NOISE_MASK_STEPS * steps))),
                          noise_threshold=float(o.noise_threshold), user=user, user_mode=mode)
    if plan.mask_source == "attention" and plan.add.any():
        return LocalBlend(plan.add, keys, start=start, threshold=o.blend_threshold,
                          subtract=sub, user=user, user_mode=mode)
    if user is not None:
        return LocalBlend(None, keys, start=start, source="user", user=user)
    return None


def composite(source: Image.Image, edited: Image.Image, mask: torch.Tensor) -> Image.Image:
    """``source * (1 - M) + edited * M`` (``M`` resized bilinearly to the image if needed)."""
    w, h = source.size
    m = mask.float()
    if tuple(m.shape) != (h, w):
        m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = m.clamp(0, 1).cpu().numpy()[..., None]
    a = np.asarray(source, dtype=np.float32)
    b = np.asarray(edited, dtype=np.float32)
    return Image.fromarray(np.clip(np.round(a * (1 - m) + b * m), 0, 255).astype(np.uint8))


class LocalBlend:
    """Keep everything outside the edited region (P2P local blending, Hertz et al. 2022, sec. 3.3).

    Two sources for the region, both giving ``rows x 1 x h x w`` masks at latent size:

    - ``"attention"`` (the published P2P blend): ``add`` (``rows x tokens``) selects each
      row's words; their stored cross-attention maps (``keys``, :func:`blend_keys`) are averaged, max-pooled
      3x3, resized to the latent, normalised by the max and thresholded; the source row's
      mask is united with each target's.
    - ``"noise"`` (DiffEdit's mask, Couairon et al. 2022, sec. 3.1, computed inside the
      edit): the caller passes, for the steps before ``noise_until``, the channel-mean of
      ``|eps(x_src, target prompt) - eps(x_src, source prompt)|`` (both conditional, on
      the source branch's latent); their sum is average-pooled 3x3, normalised by the max
      and thresholded. For models whose word maps do not localise (the bundled one).

    ``subtract`` (attention maps of words, not pooled) is removed from the mask. At steps
    ``>= start``: ``x_k = x_src + mask_k * (x_k - x_src)``.

    A user mask (``user``: the latent-size mask, ``1 x 1 x h x w`` bool, and the image-size
    one, ``h x w`` of 0/1) confines every target: ``source="user"`` blends with it alone;
    with an automatic source, ``user_mode`` ``"intersect"`` or ``"union"`` combines them.
    """

    def __init__(
        self,
        add: torch.Tensor | None,
        keys: list[StoreKey],
        *,
        start: int,
        threshold: float = 0.3,
        subtract: torch.Tensor | None = None,
        source: str = "attention",
        noise_until: int = 0,
        noise_threshold: float = 0.4,
        user: tuple[torch.Tensor, torch.Tensor] | None = None,
        user_mode: str = "user",
    ) -> None:
        if source not in ("attention", "noise", "user"):
            raise ValueError(f"unknown blend mask source {source!r}; use 'attention', 'noise' "
                             "or 'user'")
        if source == "user" and user is None:
            raise ValueError("a user-mask blend needs the user's mask")
        if user_mode not in ("user", "intersect", "union"):
            raise ValueError(f"unknown mask mode {user_mode!r}")
        if source == "attention" and (add is None or not keys):
            raise ValueError("attention blending needs words and at least one stored map")
        if source == "noise" and noise_until < 1:
            raise ValueError("noise blending needs at least one step to estimate its mask")
        self.add, self.subtract = add, subtract
        self.keys = list(keys)
        self.start = int(start)
        self.threshold = float(threshold)
        self.source = source
        self.noise_until = int(noise_until)
        self.noise_threshold = float(noise_threshold)
        self.noise: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.user = user
        self.user_mode = "user" if source == "user" else user_mode

    def to(self, device: torch.device | str) -> LocalBlend:
        """Move the blend's constant tensors (word weights, the user's masks) to ``device``,
        in place; returns ``self``."""
        if self.add is not None:
            self.add = self.add.to(device)
        if self.subtract is not None:
            self.subtract = self.subtract.to(device)
        if self.user is not None:
            self.user = (self.user[0].to(device), self.user[1].to(device))
        return self

    def wants_noise(self, step: int) -> bool:
        return self.source == "noise" and step < self.noise_until

    def observe(self, eps_source: torch.Tensor, eps_targets: torch.Tensor, step: int) -> None:
        """Accumulate ``|eps_targets - eps_source|`` (channel mean; ``1`` and ``K x C x h x w``)."""
        if not self.wants_noise(step):
            return
        d = self.difference(eps_source, eps_targets)
        self.noise = d if self.noise is None else self.noise + d

    @staticmethod
    def difference(eps_source: torch.Tensor, eps_targets: torch.Tensor) -> torch.Tensor:
        """``rows x 1 x h x w``: the channel-mean ``|eps_targets - eps_source|``, 0 on the
        source row."""
        d = (eps_targets.float() - eps_source.float()).abs().mean(1, keepdim=True)
        return torch.cat([torch.zeros_like(d[:1]), d])  # the source row: no difference

    def mask(self, store: AttentionStore | None, latent_hw: tuple[int, int],
             rows: int | None = None) -> torch.Tensor | None:
        """Boolean mask ``rows x 1 x h x w`` at latent size (None before anything was observed),
        the user's mask applied."""
        if self.source == "user":
            m = self.user[0].to(torch.bool).expand(rows, 1, *latent_hw).clone()
            m[0] = False
            return m
        m = self._auto_mask(store, latent_hw)
        if self.user is None or self.user_mode == "user":
            return m
        u = self.user[0].to(torch.bool)
        if m is None:
            if self.user_mode == "intersect" or rows is None:
                return None
            m = torch.zeros(rows, 1, *latent_hw, dtype=torch.bool, device=u.device)
        m = (m & u) if self.user_mode == "intersect" else (m | u)
        m[0] = False
        return m

    def _auto_mask(self, store: AttentionStore | None, latent_hw: tuple[int, int]
                   ) -> torch.Tensor | None:
        # word maps: the attention mask's source, and the noise mask's subtract words only
        need_maps = self.source == "attention" or self.subtract is not None
        maps = store.average(self.keys) if need_maps and self.keys and store is not None else None
        if self.source == "noise":
            if self.noise is None:
                return None
            m = F.interpolate(self._pooled_noise(), size=tuple(latent_hw), mode="bilinear",
                              align_corners=False)
            m = self._threshold(m, self.noise_threshold)
            # a target whose prompt equals the source's (e.g. reweight only) has no
            # difference map: leave it unblended rather than erase its edit
            # (a where, not boolean indexing: that reads the mask on the host, a sync that
            # a CUDA graph cannot capture)
            m = m | self._no_difference()[:, None, None, None]
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
        if self.source == "user":
            m = self.user[1].float().to(self.last_mask.device).expand(
                self.last_mask.shape[0], *size).clone()
            m[0] = 0.0
            return m
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
        m = m[:, 0].clamp(0, 1)
        if self.user is not None and self.user_mode != "user":
            u = self.user[1].float().to(m.device)
            m = torch.minimum(m, u) if self.user_mode == "intersect" else torch.maximum(m, u)
        m[0] = 0.0
        return m

    def __call__(self, latents: torch.Tensor, store: AttentionStore, step: int) -> torch.Tensor:
        if step < self.start:
            return latents
        mask = self.mask(store, tuple(latents.shape[-2:]), rows=latents.shape[0])
        if mask is None:
            return latents
        self.last_mask = mask
        src = latents[:1]
        return src + mask.to(latents.dtype) * (latents - src)
