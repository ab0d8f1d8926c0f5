"""The published Prompt-to-Prompt controllers, re-written line by line for the tests.

Sources: google/prompt-to-prompt's ``seq_aligner.py`` (``get_mapper``,
``get_replacement_mapper``), ``ptp_utils.py`` (``get_word_inds``,
``get_time_words_attention_alpha``) and the null-text notebook's controllers
(``LocalBlend``, ``AttentionStore``, ``AttentionControlEdit``, ``AttentionReplace``,
``AttentionRefine``, ``AttentionReweight``, ``get_equalizer``) and its edit loop
(``text2image_ldm_stable`` with per-step null embeddings). Each function keeps the
published control flow and arithmetic order; the adaptations, all forced by running on
diffusers attention processors and on models other than SD 1.5 at 512 px, are:

- the controller is called through :class:`editor.attention.ControlledAttnProcessor`
  (probabilities ``(batch * heads) x queries x keys``, as the published processor); it is
  told the step and the end of a step (``set_step`` / ``between_steps`` from the loop)
  instead of counting layer calls, so it need not receive the layers it never edits
  (self-attention maps larger than the injection limit, whose probabilities the
  published code passes through unchanged);
- the sizes the published code writes as constants are parameters: ``LATENT_SIZE``
  (64x64), the blend maps' side (16), the self-injected maps' limit and the stored maps'
  limit (both ``32 ** 2`` queries there; on a model with 16x16 latents the store must
  keep every map so that ``down_cross[2:4] + up_cross[:3]`` still picks the down and up
  blocks' coarsest maps, while self-attention keeps the 1/4 limit). With SD 1.5's sizes
  they are the published constants.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf

from editor.attention import AttentionController, LayerInfo

MAX_NUM_WORDS = 77


# -- seq_aligner / ptp_utils -----------------------------------------------------------------------


def get_word_inds(text: str, word_place, tokenizer) -> np.ndarray:
    """Token positions of a word (by string or position) of ``text`` split on spaces."""
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def _global_align(x, y, gap=0, match=1, mismatch=-1):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace[0, 1:] = 1
    trace[1:, 0] = 2
    trace[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace[i, j] = 1
            elif matrix[i, j] == up:
                trace[i, j] = 2
            else:
                trace[i, j] = 3
    return trace


def _aligned_mapper(x, y, trace) -> torch.Tensor:
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace[i][j] == 1:
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace[i][j] == 2:
            i = i - 1
        elif trace[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x: str, y: str, tokenizer, max_len: int = MAX_NUM_WORDS):
    """Refinement mapper and alphas of ``y`` onto ``x`` (token ids, global alignment)."""
    x_seq, y_seq = tokenizer.encode(x), tokenizer.encode(y)
    mapper_base = _aligned_mapper(x_seq, y_seq, _global_align(x_seq, y_seq))
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len: int = MAX_NUM_WORDS):
    mappers, alphas = zip(*(get_mapper(prompts[0], p, tokenizer, max_len) for p in prompts[1:]),
                          strict=True)
    return torch.stack(mappers), torch.stack(alphas)


def get_replacement_mapper_(x: str, y: str, tokenizer, max_len: int = MAX_NUM_WORDS):
    words_x, words_y = x.split(" "), y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError("replacement needs prompts of the same length")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def get_replacement_mapper(prompts, tokenizer, max_len: int = MAX_NUM_WORDS):
    return torch.stack([get_replacement_mapper_(prompts[0], p, tokenizer, max_len)
                        for p in prompts[1:]])


def update_alpha_time_word(alpha, bounds, prompt_ind, word_inds=None):
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    alpha[:start, prompt_ind, word_inds] = 0
    alpha[start:end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer,
                                   max_num_words: int = MAX_NUM_WORDS):
    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha_time_words = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha_time_words = update_alpha_time_word(alpha_time_words, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha_time_words = update_alpha_time_word(alpha_time_words, item, i, ind)
    return alpha_time_words.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)


def get_equalizer(text: str, word_select, values, tokenizer):
    if type(word_select) is int or type(word_select) is str:
        word_select = (word_select,)
    equalizer = torch.ones(1, 77)
    for word, val in zip(word_select, values, strict=True):
        inds = get_word_inds(text, word, tokenizer)
        equalizer[:, inds] = val
    return equalizer


# -- the null-text notebook's controllers -----------------------------------------------------------


class LocalBlend:
    """Blend with the chosen words' cross-attention (the down and up blocks' ``blend_side``
    maps), max-pooled 3x3, resized to the latent, thresholded; subtract words optional."""

    def get_mask(self, maps, alpha, use_pool):
        k = 1
        maps = (maps * alpha).sum(-1).mean(1)
        if use_pool:
            maps = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = nnf.interpolate(maps, size=self.latent_size)
        mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
        mask = mask.gt(self.th[1 - int(use_pool)])
        mask = mask[:1] + mask
        return mask

    def __call__(self, x_t, attention_store):
        self.counter += 1
        if self.counter > self.start_blend:
            maps = attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]
            s = self.blend_side
            maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, s, s, MAX_NUM_WORDS)
                    for item in maps]
            maps = torch.cat(maps, dim=1)
            mask = self.get_mask(maps, self.alpha_layers, True)
            if self.substruct_layers is not None:
                maps_sub = ~self.get_mask(maps, self.substruct_layers, False)
                mask = mask * maps_sub
            mask = mask.float()
            x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t

    def __init__(self, prompts, words, tokenizer, num_steps, substruct_words=None,
                 start_blend=0.2, th=(0.3, 0.3), latent_size=(64, 64), blend_side=16):
        alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_NUM_WORDS)
        for i, (prompt, words_) in enumerate(zip(prompts, words, strict=True)):
            if type(words_) is str:
                words_ = [words_]
            for word in words_:
                ind = get_word_inds(prompt, word, tokenizer)
                alpha_layers[i, :, :, :, :, ind] = 1
        if substruct_words is not None:
            substruct_layers = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_NUM_WORDS)
            for i, (prompt, words_) in enumerate(zip(prompts, substruct_words, strict=True)):
                if type(words_) is str:
                    words_ = [words_]
                for word in words_:
                    ind = get_word_inds(prompt, word, tokenizer)
                    substruct_layers[i, :, :, :, :, ind] = 1
            self.substruct_layers = substruct_layers
        else:
            self.substruct_layers = None
        self.alpha_layers = alpha_layers
        self.start_blend = int(start_blend * num_steps)
        self.counter = 0
        self.th = th
        self.latent_size = latent_size
        self.blend_side = blend_side


class AttentionStore(AttentionController):
    """The published store; ``store_max_queries`` is its ``32 ** 2``."""

    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [],
                "down_self": [], "mid_self": [], "up_self": []}

    def step_callback(self, x_t):
        return x_t

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= self.store_max_queries:
            self.step_store[key].append(attn)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    # -- the adaptation to diffusers processors (see the module docstring) ------------------

    def wants(self, layer: LayerInfo) -> bool:
        return layer.cross or layer.queries <= self.max_queries

    def __call__(self, probs, layer: LayerInfo, heads: int):
        place = "mid" if layer.mid else layer.name.split("_", 1)[0]
        h = probs.shape[0]
        probs[h // 2:] = self.forward(probs[h // 2:], layer.cross, place)
        return probs

    def __init__(self, max_queries: int = 32**2, store_max_queries: int = 32**2):
        super().__init__()
        self.max_queries = max_queries
        self.store_max_queries = store_max_queries
        self.step_store = self.get_empty_store()
        self.attention_store = {}


class AttentionControlEdit(AttentionStore):
    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= self.max_queries:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    def replace_cross_attention(self, attn_base, att_replace):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        super().forward(attn, is_cross, place_in_unet)
        if is_cross or (self.num_self_replace[0] <= self.step < self.num_self_replace[1]):
            h = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_repalce = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.step]
                attn_repalce_new = (self.replace_cross_attention(attn_base, attn_repalce)
                                    * alpha_words + (1 - alpha_words) * attn_repalce)
                attn[1:] = attn_repalce_new
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_repalce)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                 tokenizer, max_queries=32**2, store_max_queries=32**2):
        super().__init__(max_queries, store_max_queries)
        self.batch_size = len(prompts)
        self.cross_replace_alpha = get_time_words_attention_alpha(
            prompts, num_steps, cross_replace_steps, tokenizer)
        if type(self_replace_steps) is float:
            self_replace_steps = 0, self_replace_steps
        self.num_self_replace = (int(num_steps * self_replace_steps[0]),
                                 int(num_steps * self_replace_steps[1]))
        self.local_blend = local_blend


class AttentionReplace(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps,
                 local_blend=None, tokenizer=None, max_queries=32**2, store_max_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps,
                         local_blend, tokenizer, max_queries, store_max_queries)
        self.mapper = get_replacement_mapper(prompts, tokenizer)


class AttentionRefine(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return attn_base_replace * self.alphas + att_replace * (1 - self.alphas)

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps,
                 local_blend=None, tokenizer=None, max_queries=32**2, store_max_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps,
                         local_blend, tokenizer, max_queries, store_max_queries)
        self.mapper, alphas = get_refinement_mapper(prompts, tokenizer)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])


class AttentionReweight(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        return attn_base[None, :, :, :] * self.equalizer[:, None, None, :]

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, equalizer,
                 local_blend=None, controller=None, tokenizer=None, max_queries=32**2,
                 store_max_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps,
                         local_blend, tokenizer, max_queries, store_max_queries)
        self.equalizer = equalizer
        self.prev_controller = controller


# -- the edit loop ------------------------------------------------------------------------------------


@torch.no_grad()
def edit_loop(unet, scheduler, controller, text_embeddings, x_t, uncond_embeddings, timesteps,
              guidance_scale, latent_hw):
    """``text2image_ldm_stable`` with the inversion's per-step null embeddings: the final
    latents of the source (row 0) and target rows."""
    from editor.attention import attention_control

    latents = x_t.expand(text_embeddings.shape[0], *x_t.shape[1:])
    with attention_control(unet, controller, latent_hw):
        for i, t in enumerate(timesteps):
            controller.set_step(i)
            context = torch.cat([uncond_embeddings[i].expand(*text_embeddings.shape),
                                 text_embeddings])
            noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
            noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            controller.between_steps()
            latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
            latents = controller.step_callback(latents)
    return latents
