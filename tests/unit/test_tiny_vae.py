"""`vae_decoder = "tiny"` profiles: the fields, their refusals (file, line, field), the plan's
AutoencoderTiny, the keys, and when the probe turns VAE slicing on. No torch here."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lcmq import keys
from lcmq.errors import ModelLoadError, ProfileError
from lcmq.modelpack import profile_model_urls
from lcmq.profiles import BUILTIN_PROFILES, TAESD_HUB, load_profiles, preflight
from worker.memory import choose_with_vae_slicing
from worker.pipeline import REMOTE_FIELDS, plan_load

pytestmark = pytest.mark.usefixtures("fresh_profiles")


def _load(tmp_path, text: str):
    config = tmp_path / "lcmq.toml"
    config.write_text(text)
    return config, load_profiles(config)


def test_a_tiny_profile_plans_an_autoencoder_tiny_in_place_of_the_vae(tmp_path):
    _, profiles = _load(
        tmp_path,
        '[profiles.fast]\nfamily = "sd15"\nbase = "shop/tune"\nvae_decoder = "tiny"\ntiny_vae = "madebyollin/taesd"\n'
        '[profiles.fast-xl]\nfamily = "sdxl"\nbase = "shop/x"\nvae_decoder = "tiny"\ntiny_vae = "madebyollin/taesdxl"\n'
        '[profiles.sdxl]\nvae_decoder = "tiny"\ntiny_vae = "madebyollin/taesdxl"\n',
    )
    plan = plan_load(profiles["fast"], "cuda")
    assert (plan.tiny_vae, plan.vae) == ("madebyollin/taesd", None)
    # The sdxl family's default fp16-fix VAE is a full VAE: the tiny one replaces it.
    for name in ("fast-xl", "sdxl"):
        assert profiles[name].vae is None and plan_load(profiles[name], "cuda").tiny_vae == TAESD_HUB["sdxl"]
    assert plan_load(BUILTIN_PROFILES["tiny"], "cpu").tiny_vae is None  # the default: the full VAE
    assert profiles["fast"].to_dict()["vae_decoder"] == "tiny"
    assert "vae_decoder" not in BUILTIN_PROFILES["tiny"].to_dict()  # shown only when set
    assert "tiny_vae" in REMOTE_FIELDS  # an s3:// tiny VAE is fetched like any other model
    s3 = replace(profiles["fast"], tiny_vae="s3://b/models/taesd/")
    assert profile_model_urls(s3) == {"s3://b/models/taesd/"}  # the gateway presigns it for edges


@pytest.mark.parametrize(
    ("table", "line", "message"),
    [
        (
            'family = "sd15"\nbase = "/m"\nvae_decoder = "tiny"\n',
            6,  # the line that asks for it
            r'\[profiles\.mine\]\.tiny_vae: required with vae_decoder = "tiny": .*"madebyollin/taesd"',
        ),
        (
            'family = "sd15"\nbase = "/m"\ntiny_vae = "madebyollin/taesd"\n',
            6,
            r'\[profiles\.mine\]\.tiny_vae: tiny_vae is only used with vae_decoder = "tiny"',
        ),
        (
            'family = "sd15"\nbase = "/m"\nvae = "/m/vae"\nvae_decoder = "tiny"\ntiny_vae = "/m/taesd"\n',
            6,
            r'\[profiles\.mine\]\.vae: vae replaces the full VAE, which vae_decoder = "tiny" does not load',
        ),
        (
            'family = "sdxl"\nbase = "/m"\nvae_decoder = "tiny"\ntiny_vae = "madebyollin/taesd"\n',
            7,
            r"\[profiles\.mine\]\.tiny_vae: madebyollin/taesd is the sd15 family's tiny VAE; a sdxl profile "
            r'needs "madebyollin/taesdxl"',
        ),
    ],
)
def test_a_tiny_vae_mistake_names_file_line_and_field(tmp_path, table, line, message):
    text = "# farm profiles\n\n[profiles.mine]\n" + table
    with pytest.raises(ProfileError, match=message) as refused:
        _load(tmp_path, text)
    assert str(refused.value).startswith(f"{tmp_path / 'lcmq.toml'}:{line}: [profiles.mine].")


def test_wrong_types_of_the_new_fields_are_named(tmp_path):
    for table, message in (
        ('vae_decoder = "small"', "vae_decoder: must be one of full, tiny (got 'small')"),
        ("tiny_vae = 3", "tiny_vae: must be a string (got 3)"),
    ):
        with pytest.raises(ProfileError) as refused:
            _load(tmp_path, f"[profiles.tiny]\n{table}\n")
        assert str(refused.value) == f"{tmp_path / 'lcmq.toml'}: [profiles.tiny].{message}"


def test_preflight_refuses_a_tiny_vae_folder_that_holds_a_full_vae(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    profile = replace(BUILTIN_PROFILES["tiny"], vae_decoder="tiny", tiny_vae=str(folder))
    with pytest.raises(ProfileError, match=r"profile 'tiny': tiny_vae .*/vae holds a AutoencoderKL, not an Autoen"):
        preflight(profile)
    with pytest.raises(ModelLoadError, match="not an AutoencoderTiny"):  # the worker's load says the same
        plan_load(profile, "cpu")
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    preflight(profile)
    missing = replace(profile, tiny_vae=str(tmp_path / "absent"))
    with pytest.raises(ProfileError, match=r"profile 'tiny': tiny_vae path .*/absent does not exist"):
        preflight(missing)


def test_profiles_made_in_code_are_checked_too():
    tiny = BUILTIN_PROFILES["tiny"]
    cases = [
        (replace(tiny, vae_decoder="tiny"), 'tiny_vae is required with vae_decoder = "tiny"'),
        (replace(tiny, tiny_vae="madebyollin/taesd"), 'tiny_vae is only used with vae_decoder = "tiny"'),
        (replace(tiny, vae_decoder="fast"), "vae_decoder must be one of full, tiny"),
        (replace(BUILTIN_PROFILES["sdxl"], vae_decoder="tiny", tiny_vae="madebyollin/taesdxl"), "exclude each other"),
    ]
    for profile, message in cases:
        with pytest.raises(ProfileError, match=message):
            preflight(profile)


# Pinned: a tiny-VAE profile's keys differ from its full twin's, and stay these.
TINY_TAESD = replace(BUILTIN_PROFILES["tiny"], vae_decoder="tiny", tiny_vae="lcmq-generated:tiny-sd15-taesd")
TAESD_IDEMPOTENCY_KEY = "9a66963d70bf3750d0c4b07ad84bc545ff39c3f3fec99d191761869cc012855a"
TAESD_RENDER_KEY = "7bc61148a52b28164f8c09261cee83ed5d5b21a85fa9393520cd5171535d9f3c"


def test_the_decoder_choice_is_in_the_keys_and_the_manifest_identity():
    from lcmq.spec import BatchOptions, JobSpec

    spec, options = JobSpec(0, "a red fox", "", 42, 4, 1.0, 64, 64), BatchOptions(model="tiny")
    full = BUILTIN_PROFILES["tiny"]
    assert keys.idempotency_key("c" * 64, options, TINY_TAESD, 32) == TAESD_IDEMPOTENCY_KEY
    assert keys.render_key(spec, TINY_TAESD, "png") == TAESD_RENDER_KEY
    assert keys.render_key(spec, TINY_TAESD, "png") != keys.render_key(spec, full, "png")
    assert keys.model_identity(TINY_TAESD) == keys.model_identity(full) | {
        "vae_decoder": "tiny",
        "tiny_vae": "lcmq-generated:tiny-sd15-taesd",
    }
    assert set(keys.model_identity(full)) == {"family", "base", "lcm_lora", "dtype"}  # full: as before


def test_the_probe_slices_the_vae_only_above_the_size_that_fits_without():
    slicing = []

    def peak(size):  # 1000 MiB of weights, 50 MiB per image, 250 per image decoded at once
        sliced = bool(slicing) and slicing[-1] and size > 1
        return 1000 + 50 * size + (250 if sliced else 250 * size)

    choice = choose_with_vae_slicing(peak, budget_mb=2300, max_batch=8, set_slicing=slicing.append)
    # Unsliced: 1 → 1300, 2 → 1600, 4 → 2200, 8 → 3400 (over); sliced: 8 → 1650.
    assert (choice.size, choice.slicing_above) == (8, 4)
    assert choice.peaks == {1: 1300, 2: 1600, 4: 2200, 8: 3400} and choice.sliced_peaks == {8: 1650}
    assert slicing == [True, False]  # left off: the worker slices per call, above 4
    fits = choose_with_vae_slicing(peak, budget_mb=10**6, max_batch=8, set_slicing=slicing.append)
    assert (fits.size, fits.slicing_above, fits.sliced_peaks) == (8, None, {})  # never needed
    tight = choose_with_vae_slicing(peak, budget_mb=1500, max_batch=8, set_slicing=slicing.append)
    assert (tight.size, tight.slicing_above) == (4, 1)  # sliced: 2 → 1350, 4 → 1450, 8 → 1650 (over)
    no_vae = choose_with_vae_slicing(peak, budget_mb=2300, max_batch=8, set_slicing=None)
    assert (no_vae.size, no_vae.slicing_above) == (4, None)
