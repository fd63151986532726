"""GenerationSettings (one validated object for the sampler's settings), keyword overrides, the one
hook-name resolver at every entry point, and the deprecated names."""

from __future__ import annotations

import json
import re

import pytest
import torch
from reference import CANVAS

from diffusionlens import GenerationSettings, ReplayNoise
from diffusionlens.cli import main
from diffusionlens.patching import Patch, patch_hooks
from diffusionlens.sampling.settings import FROM_CONFIG, merge_settings

TYPO = "decoder.blocks.0.hook_resid_psot"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "bad, fix",
    [
        (dict(max_denoising_steps=0), "max_denoising_steps must be a positive int"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive int"),
        (dict(t_min=0.9, t_max=0.5), "schedule runs from t_max down to t_min"),
        (dict(record_top_k=-1), "record_top_k must be >= 0"),
        (dict(eos_token_id="eos"), "eos_token_id must be a token id, None or 'from_config'"),
        (dict(pad_token_id=1.5), "pad_token_id must be int token id"),
        (dict(max_denoising_steps=True), "max_denoising_steps must be a positive int"),
    ],
)
def test_bad_settings_name_the_field_and_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix):
        GenerationSettings(**bad)


def test_defaults_and_replace():
    settings = GenerationSettings()
    assert (settings.max_denoising_steps, settings.max_new_tokens, settings.eos_token_id) == (48, 256, FROM_CONFIG)
    assert GenerationSettings.max_denoising_steps == 48  # the class attribute other modules take defaults from
    assert settings.replace(eos_token_id=[1, 2]).eos_token_id == (1, 2)
    with pytest.raises(TypeError, match="no field"):
        settings.replace(max_steps=4)
    with pytest.raises(ValueError, match="entropy_bound"):
        settings.replace(entropy_bound=-1.0)


def test_keywords_override_settings_and_none_disables_eos():
    base = GenerationSettings(max_denoising_steps=6, eos_token_id=3)
    merged = merge_settings(base, max_denoising_steps=4, t_min=None, eos_token_id=None)
    assert (merged.max_denoising_steps, merged.t_min, merged.eos_token_id) == (4, base.t_min, None)
    assert merge_settings(None) == GenerationSettings()
    with pytest.raises(TypeError, match="GenerationSettings"):
        merge_settings({"max_denoising_steps": 4})


def test_settings_object_generates_what_the_keywords_generate(model, ids):
    keywords = dict(max_new_tokens=CANVAS["mixed"], max_denoising_steps=5, entropy_bound=0.3, eos_token_id=None)
    by_keywords = model.generate(ids, noise=ReplayNoise(2), progress=False, **keywords)
    settings = GenerationSettings(**keywords)
    by_object = model.generate(ids, settings=settings, noise=ReplayNoise(2), progress=False)
    assert torch.equal(by_keywords.sequences, by_object.sequences)
    assert by_object.trace.settings == by_keywords.trace.settings
    assert by_object.trace.settings["max_denoising_steps"] == 5
    overridden = model.generate(
        ids,
        settings=settings.replace(max_denoising_steps=9),
        max_denoising_steps=5,
        noise=ReplayNoise(2),
        progress=False,
    )
    assert torch.equal(overridden.sequences, by_keywords.sequences)


def test_cli_refuses_bad_settings_with_the_fix(capsys):
    with pytest.raises(SystemExit, match="t_min=0.9 > t_max=0.5"):
        main(["generate", "--prompt", "347+589=", "--t-min", "0.9", "--t-max", "0.5", "--no-progress"])


# ---------------------------------------------------------------------- one resolver, every entry point
def test_a_typo_raises_naming_the_nearest_hook_everywhere(model, ids):
    canvas = torch.zeros(2, CANVAS["mixed"], dtype=torch.long)
    nearest = "Nearest names: decoder.blocks.0.hook_resid_post"
    with pytest.raises(KeyError, match=nearest):
        model.run_with_hooks(ids, canvas, fwd_hooks=[(TYPO, lambda x, h: None)])
    with pytest.raises(KeyError, match=nearest):
        model.run_with_cache(ids, canvas, names_filter=TYPO)
    with pytest.raises(
        KeyError, match=r"Unknown hook point 'decoder.blocks.\*.hook_resid_psot'. Nearest names: decoder"
    ):
        model.run_with_cache(ids, canvas, names_filter=["decoder.hook_logits", "decoder.blocks.*.hook_resid_psot"])
    with pytest.raises(KeyError, match=nearest):
        model.generate_with_cache(ids, names_filter=TYPO, max_new_tokens=8, max_denoising_steps=2, progress=False)
    with pytest.raises(KeyError, match=nearest):
        patch_hooks(model, Patch(TYPO, torch.zeros(())), max_steps=2)
    assert not model.has_hooks  # nothing was left attached by the refused calls


def test_predicates_and_regexes_resolve_and_a_predicate_matching_nothing_raises(model, ids):
    canvas = torch.zeros(2, CANVAS["mixed"], dtype=torch.long)
    _, cache = model.run_with_cache(ids, canvas, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(cache.keys()) == sorted(n for n in model.hook_dict if n.endswith("hook_resid_post"))
    _, cache = model.run_with_cache(ids, canvas, names_filter=r"decoder\.blocks\.(0|1)\.hook_resid_post")
    assert sorted(cache.keys()) == ["decoder.blocks.0.hook_resid_post", "decoder.blocks.1.hook_resid_post"]

    def nothing(name: str) -> bool:
        return name.startswith("no such")

    with pytest.raises(KeyError, match="'nothing' matched no hook point"):
        model.run_with_cache(ids, canvas, names_filter=nothing)
    with pytest.raises(KeyError, match="matched no hook point"):
        model.generate_with_cache(ids, names_filter=nothing, max_new_tokens=8, max_denoising_steps=2, progress=False)
    with pytest.raises(TypeError, match="names_filter must be"):
        model.run_with_cache(ids, canvas, names_filter=3)


def test_cli_typos_exit_naming_the_nearest_hook(tmp_path, capsys):
    with pytest.raises(SystemExit, match="Nearest names: decoder.blocks.1.hook_resid_post"):
        main(
            [
                "trace",
                "--prompt",
                "347+589=",
                "--out",
                str(tmp_path / "t"),
                "--cache",
                "decoder.blocks.1.hook_resid_psot",
            ]
        )
    assert not (tmp_path / "t" / "cache").exists()
    spec = {
        "clean": "squares 400 800:",
        "corrupted": "squares 600 800:",
        "hook": "decoder.blocks.{layer}.hook_resid_psot",
        "over": ["layer", "position"],
        "layers": [0],
        "positions": [0],
        "metric": {"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", str(tmp_path / "spec.json"), "--out", str(tmp_path / "sweep"), "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert re.search(
        "diffusionlens patch: .*Unknown hook point .*Nearest names: decoder.blocks.0.hook_resid_post", error
    )


# ---------------------------------------------------------------------- renamed names
def test_renamed_names_have_no_aliases_left(model):
    # The package was never released: old names are gone, not kept as deprecation shims.
    import diffusionlens.sampling as sampling
    from diffusionlens.sampling import sampler

    assert not hasattr(sampling, "SamplerSettings") and not hasattr(sampler, "SamplerSettings")
    assert not hasattr(model, "_check_tokens") and not hasattr(model, "_need_tokenizer")
