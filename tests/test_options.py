"""Options live once (editor/options.py): defaults, validation, mappings, and every face's
names are the engine's."""

from __future__ import annotations

import math

import pytest

from editor import cli
from editor.options import EditOptions, GenerateOptions, InvertOptions


def test_defaults_are_written_once_and_read_by_every_face():
    e, i = EditOptions(), InvertOptions()
    assert (e.cross_replace, e.self_replace, e.blend_threshold, e.blend_start) == (0.8, 0.4, 0.3, 0.2)
    assert (i.method, i.steps, i.guidance, i.num_inner_steps) == ("null-text", 50, 7.5, 10)
    args = cli.build_parser().parse_args(["edit", "x.safetensors", "--target", "t", "-o", "o.png"])
    assert cli.edit_options(args) == e  # no flag given: the dataclass's own defaults
    args = cli.build_parser().parse_args(["invert", "x.png", "--prompt", "p", "-o", "x.safetensors"])
    assert args.steps == i.steps and args.guidance == i.guidance and args.method == i.method


@pytest.mark.parametrize("flags, field, value", [
    (["--cross-replace", "0.6"], "cross_replace", 0.6),
    (["--self-replace", "0.35"], "self_replace", 0.35),
    (["--mode", "refine"], "mode", "refine"),
    (["--blend", "red", "blue"], "blend_words", ("red", "blue")),
    (["--no-blend"], "blend_words", None),
    (["--blend-subtract", "sky"], "blend_subtract", ("sky",)),
    (["--blend-threshold", "0.9"], "blend_threshold", 0.9),
    (["--blend-maps", "half"], "blend_maps", "half"),
    (["--self-layers", "prompt-to-prompt"], "self_max_fraction", "prompt-to-prompt"),
    (["--mask-threshold", "0.3"], "noise_threshold", 0.3),
    (["--reweight", "red=1.5"], "reweight", {"red": 1.5}),
    (["--protect", "a blue square"], "protect", ("a blue square",)),
    (["--leakage", "project"], "leakage", "project"),
    (["--guidance", "5"], "guidance", 5.0),
])
def test_every_edit_flag_maps_onto_an_edit_option(flags, field, value):
    args = cli.build_parser().parse_args(["edit", "x.safetensors", "--target", "t", "-o", "o.png",
                                          *flags])
    assert getattr(cli.edit_options(args), field) == value


def test_web_app_controls_map_onto_edit_options():
    from ui import app

    o = app.edit_options(0.6, 0.5, True, "red, blue", "red=2", "white background", "project", 0.4)
    assert isinstance(o, EditOptions)
    assert (o.cross_replace, o.self_replace, o.blend_words, o.reweight, o.protect, o.leakage,
            o.noise_threshold) == (0.6, 0.5, ("red", "blue"), {"red": 2.0},
                                   ("white background",), "project", 0.4)
    assert app.edit_options(0.8, 0.4, False, "", "", "", "replace", 0.5).blend_words is None


def test_from_mapping_refuses_unknown_keys_and_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown edit option 'cross_replce' \(valid: mode, "):
        EditOptions.from_mapping({"cross_replce": 0.5})
    with pytest.raises(ValueError, match="unknown inversion options 'a', 'b'"):
        InvertOptions.from_mapping({"a": 1, "b": 2})
    assert EditOptions.from_mapping({"self_replace": [0.1, 0.5]}).self_replace == (0.1, 0.5)
    base = EditOptions(cross_replace=0.6)
    assert EditOptions.from_mapping({"self_replace": 1.0}, base=base).cross_replace == 0.6


@pytest.mark.parametrize("make, words", [
    (lambda: InvertOptions(steps=-1), "steps must be an integer in 1..1000"),
    (lambda: InvertOptions(steps=2.5), "steps must be an integer"),
    (lambda: InvertOptions(steps=True), "steps must be an integer"),
    (lambda: InvertOptions(guidance=math.nan), "guidance must be a finite number"),
    (lambda: InvertOptions(guidance=math.inf), "guidance must be a finite number"),
    (lambda: InvertOptions(guidance=0.5), r"guidance must be in \[1, 100\]"),
    (lambda: InvertOptions(num_inner_steps=2.5), "num_inner_steps must be an integer"),
    (lambda: InvertOptions(max_pixels=-1), "max_pixels must be an integer"),
    (lambda: InvertOptions(early_stop_epsilon=math.nan), "early_stop_epsilon must be a finite"),
    (lambda: InvertOptions(method="magic"), "unknown inversion method 'magic'"),
    (lambda: InvertOptions(fast="turbo"), "unknown fast mode"),
    (lambda: EditOptions(cross_replace=1.5), r"cross_replace must lie in \[0, 1\]"),
    (lambda: EditOptions(cross_replace=(0.6, 0.2)), "start <= end"),
    (lambda: EditOptions(cross_replace={"red": 2.0}), r"cross_replace\['red'\]"),
    (lambda: EditOptions(self_replace=math.nan), "self_replace must lie in"),
    (lambda: EditOptions(guidance=math.nan), "guidance must be a finite number"),
    (lambda: EditOptions(reweight={"red": 1e30}), "reweight factor for 'red'"),
    (lambda: EditOptions(reweight={"red": math.inf}), "reweight factor for 'red' must be a finite"),
    (lambda: EditOptions(reweight={"red": "two"}), "reweight factor for 'red' must be a finite"),
    (lambda: EditOptions(noise_threshold=1.0), r"noise_threshold must be in \[0, 1\)"),
    (lambda: EditOptions(blend_threshold=-0.1), "blend_threshold must be in"),
    (lambda: EditOptions(blend_words=[""]), "blend_words contains an empty word"),
    (lambda: EditOptions(blend_maps="all"), "unknown blend_maps 'all'"),
    (lambda: EditOptions(self_max_fraction="most"), "unknown self-attention rule 'most'"),
    (lambda: EditOptions(pixel_blend="yes"), "pixel_blend must be true or false"),
    (lambda: EditOptions(leakage="hide"), "unknown leakage mode 'hide'"),
    (lambda: EditOptions(mode="swap"), "unknown mode 'swap'"),
    (lambda: GenerateOptions(steps=0), "steps must be an integer in 1..1000"),
    (lambda: GenerateOptions(guidance=math.nan), "guidance must be a finite number"),
    (lambda: GenerateOptions(seed=-1), "seed must be an integer"),
])
def test_bad_values_are_refused_when_made(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_options_are_frozen_plain_data():
    o = EditOptions(reweight={"red": 2}, protect="white background")
    assert o.reweight == {"red": 2.0} and o.protect == ("white background",)
    with pytest.raises(AttributeError):
        o.mode = "refine"  # type: ignore[misc]
    assert o.replace(mode="refine").mode == "refine" and o.mode == "auto"
    d = o.to_dict()
    assert d["protect"] == ["white background"] and EditOptions.from_mapping(d) == o
    assert EditOptions(self_max_fraction="prompt-to-prompt").self_fraction == 1 / 16
    assert EditOptions().self_fraction == 0.25
    key = InvertOptions(method="ddim", num_inner_steps=3).result_key()
    assert "num_inner_steps" not in key and key["method"] == "ddim"
