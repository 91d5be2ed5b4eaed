"""The keys that find earlier work, pinned: a resubmitted batch must find its batch and a catalog
run must leave an unchanged item alone, so these hex values may never change for these inputs.

They were recorded from the code before the include-lists (the `del`-based keys), and adding a
field to BatchOptions, JobSpec or Profile must not change them either.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass, replace

import pytest

from lcmq import keys
from lcmq.profiles import BUILTIN_PROFILES, Profile
from lcmq.spec import BatchOptions, JobSpec

CONTENT = "c" * 64
CHUNK_SIZE = 32
TINY = BUILTIN_PROFILES["tiny"]
INK = {"name": "ink", "path": "/loras/ink.safetensors", "weight": 0.8}
PROFILES = {
    "tiny": TINY,
    "sdxl": BUILTIN_PROFILES["sdxl"],
    "tiny-sliced": replace(TINY, attention_slicing=True, vae_tiling=True),
    "tiny-offload": replace(TINY, vae_slicing=True, cpu_offload=True),
    "tiny-lora": replace(TINY, loras=(INK,)),
    "single-file": replace(
        TINY, name="shop", base="/m/shop.safetensors", config="/m/sd15", vae="/m/vae", guidance=1.5, steps=6
    ),
}
OPTIONS = {
    "png": BatchOptions(model="tiny"),
    "png-quality-none": BatchOptions(model="tiny", image_format="png", quality=None),
    "webp85": BatchOptions(model="tiny", image_format="webp", quality=85),
    "jpeg90": BatchOptions(model="tiny", image_format="jpeg", quality=90),
    "matrix": BatchOptions(model="tiny", matrix=(("seed", (0, 1)), ("style", ("oil", "ink")))),
    "lora": BatchOptions(model="tiny", loras=(INK,)),
    "no-lora": BatchOptions(model="tiny", loras=()),  # `loras=[]`: no LoRA, not the profile's
    "all": BatchOptions(
        model="tiny",
        steps=6,
        guidance=1.5,
        negative_prompt="blurry",
        width=128,
        height=96,
        seed=7,
        name="shop run",
        image_format="webp",
        quality=80,
        matrix=(("steps", (4, 6)),),
        loras=(INK,),
    ),
}
SPECS = {
    "plain": JobSpec(0, "a red fox", "", 42, 4, 1.0, 64, 64),
    "full": JobSpec(3, "a blue owl, ünïcödé 🦉", "blurry", 7, 6, 1.5, 128, 96, metadata={"sku": "A-1"}, row=1),
    "lora": JobSpec(0, "a red fox", "", 42, 4, 1.0, 64, 64, loras=(INK,)),
    "img2img": JobSpec(
        0, "a red fox", "", 42, 4, 1.0, 64, 64, init_image="s3://b/in.png", strength=0.6, upload_init=True
    ),
}

IDEMPOTENCY_KEYS = {
    ("png", "tiny"): "23326bc65a4c0cc3afe7f0a72626073de5208bfd6b383b2d526e7a21afd93df9",
    ("png", "sdxl"): "a515884efbc9f73bf3545f90224eaba2b441a6d968dfbdbc7ace0ec0408e98eb",
    ("png", "tiny-sliced"): "61c81d2d8db34b1d78f4efb6c68d36281db192577c0a445c76b01fbb73c60cb6",
    ("png", "tiny-offload"): "49ac10cf7aadc967df0508712e34d64ca14b280dc3b84c5868ce8d0729555873",
    ("png", "tiny-lora"): "4327a8b5eb79374ed7011d69a54b9f731243f564291217428763827aa946f2a2",
    ("png", "single-file"): "a4d9c062ec07a2addaa388096a70167d4ea2248031a07890b504659acacef393",
    ("png-quality-none", "tiny"): "23326bc65a4c0cc3afe7f0a72626073de5208bfd6b383b2d526e7a21afd93df9",
    ("webp85", "tiny"): "21aa6754e1fbc0eff44ac760e898c141412c92a081e4a520a3a2fcfb5a93c33a",
    ("jpeg90", "tiny"): "bff999c73cf1b114ebb1886ac833ecb078c1845459c309a221cbaf8c3bbb4787",
    ("matrix", "tiny"): "8aa5eeff32e0479f0442c9406bbf57f4289cfcba0b29efeab6b9a150001b3747",
    ("lora", "tiny"): "5086c2be1506ce876091675f233a36b5642e836737a5afeaeecf98b92b1f561b",
    ("no-lora", "tiny"): "9aa13feb1f505bbd7da407fff939c96f4015e3287de918c6d11e90db3caa5047",
    ("all", "tiny"): "d1e47900f540c87c240b5ce8236c89d9242a90ef2708bdb947252388a664bdd7",
}
RENDER_KEYS = {
    ("plain", "tiny", "png"): "6c517cdb530c8be9a1f1aa528d40f6830f2b4aecff3097ab6e1330070d6f299f",
    ("plain", "tiny", "webp:85"): "0634971dcf701a2ed14d897e9100285288ca653a97f74f1583bc366999a61ee6",
    ("plain", "sdxl", "png"): "5f5f9bb75ea38cea531441c02070fc1ee7eb2a0982aae83311201e7fbb6cfe40",
    ("plain", "tiny-sliced", "png"): "4751ad6ae98fe2ce68814fe0e65a88c10f6418accc04dd31f27ffa1cd0b49325",
    ("plain", "tiny-offload", "png"): "88cec5275aa08f582ed8bd4b068031d0d136961bd3c7c15930efa5519c0afaf1",
    ("plain", "tiny-lora", "png"): "5d4bd98ae0475a299fdd6c5f5232f07078b8c175c1d473560ccd8f5c864acac9",
    ("plain", "single-file", "png"): "4ec5919826f932d4732468876124e0e82e3cf8f80e5192853e40816580babcc2",
    ("full", "tiny", "png"): "c387e70ac6a395d324de2de250bc3b3fe07d126ed1f62166ac87d0662441676d",
    ("lora", "tiny", "png"): "5f4652cb26380ac0c2b508a61c8ac6bc29b39f1196c799ed9b8ba44841edf881",
    ("img2img", "tiny", "png"): "6265b97b30648f5ed04acc6588ea6a7b21977d31f1a597b4825d00c41d972024",
    ("img2img", "tiny-lora", "webp:85"): "509ec4567e95f3ed788e75559a5c0bd410831f73b7449824cd08f4385046b20b",
}
# The content hash of rows given as objects (lcmq.submit([...])), part of their idempotency key.
CONTENT_HASHES = {
    "plain": "1d71cdf73ae7efc75d95fc32d5f92813579d580c0c6af4d2c984559b91afcad8",
    "full": "c8eded9c5599b3920bfbca42edcd9c2bfbbd611d5cf3cd80ce7eb0b05718e6a3",
    "lora": "75f2ac50d1ce6879c5495cc368a0fbfc0a14caeb2238e10f0be6e37fec4d4cf5",
    "img2img": "bb0be745c7add3f2f236a30caf29d946644cdc7a53501122a03605268275dc27",
}
ALL_SPECS_CONTENT_HASH = "734c5e72ed74484d785af14d7eae936d79ded9897f859203b3211b6a6bed6716"


@pytest.mark.parametrize(("options", "profile"), sorted(IDEMPOTENCY_KEYS))
def test_idempotency_keys_are_pinned(options, profile):
    key = keys.idempotency_key(CONTENT, OPTIONS[options], PROFILES[profile], CHUNK_SIZE)
    assert key == IDEMPOTENCY_KEYS[options, profile]


@pytest.mark.parametrize(("spec", "profile", "output_format"), sorted(RENDER_KEYS))
def test_render_keys_are_pinned(spec, profile, output_format):
    key = keys.render_key(SPECS[spec], PROFILES[profile], output_format)
    assert key == RENDER_KEYS[spec, profile, output_format]


def test_content_hashes_are_pinned():
    for name, spec in SPECS.items():
        assert keys.content_sha256([spec]) == CONTENT_HASHES[name], name
    assert keys.content_sha256(SPECS.values()) == ALL_SPECS_CONTENT_HASH


def test_model_identity_is_pinned():
    assert keys.model_identity(BUILTIN_PROFILES["tiny"]) == {
        "family": "sd15",
        "base": "lcmq-generated:tiny-sd15",
        "lcm_lora": "lcmq-generated:tiny-sd15-lcm-lora",
        "dtype": "float32",
    }
    assert keys.model_identity(PROFILES["single-file"]) == {
        "family": "sd15",
        "base": "/m/shop.safetensors",
        "lcm_lora": "lcmq-generated:tiny-sd15-lcm-lora",
        "dtype": "float32",
    }


# --- a new field changes no key -------------------------------------------------------------


def _with_new_field(cls: type, name: str, default):
    """`cls` as it would be with one more field (with its default), as a later change adds one."""
    return make_dataclass(
        f"Newer{cls.__name__}", [(name, type(default), field(default=default))], bases=(cls,), frozen=True
    )


def _as(cls: type, instance):
    return cls(**{f.name: getattr(instance, f.name) for f in fields(instance)})


def test_a_new_options_field_changes_no_idempotency_key():
    newer_options = _with_new_field(BatchOptions, "upscale", 1)
    for name in ("png", "webp85", "all"):
        options = _as(newer_options, OPTIONS[name])
        assert keys.idempotency_key(CONTENT, options, TINY, CHUNK_SIZE) == IDEMPOTENCY_KEYS[name, "tiny"]


def test_a_new_profile_field_changes_no_key():
    newer_profile = _with_new_field(Profile, "sharpen", False)
    for name in ("tiny", "sdxl", "single-file"):
        profile = _as(newer_profile, PROFILES[name])
        key = keys.idempotency_key(CONTENT, OPTIONS["png"], profile, CHUNK_SIZE)
        assert key == IDEMPOTENCY_KEYS["png", name]
        assert keys.render_key(SPECS["plain"], profile, "png") == RENDER_KEYS["plain", name, "png"]
        assert keys.model_identity(profile) == keys.model_identity(PROFILES[name])


def test_a_new_job_field_changes_no_key():
    newer_spec = _with_new_field(JobSpec, "clip_skip", 0)
    for name in ("plain", "img2img"):
        spec = _as(newer_spec, SPECS[name])
        assert keys.content_sha256([spec]) == CONTENT_HASHES[name]
        assert keys.render_key(spec, TINY, "png") == RENDER_KEYS[name, "tiny", "png"]


# Fields deliberately not in a key. A field added to one of these dataclasses fails the test below
# until it is listed in lcmq/keys.py (with `absent` values, so stored keys stay) or here.
NOT_IN_RENDER_KEY = {"index", "row", "metadata", "upload_init"}  # not what decides the pixels


@pytest.mark.parametrize(
    ("cls", "key_fields", "left_out"),
    [
        (BatchOptions, keys.IDEMPOTENCY_KEY_V1, set()),
        # A profile's declared control models are hashed where jobs use them: each job's control
        # entries carry their model (RENDER_KEY_V2, CONTENT_KEY_V1), so declaring one re-renders nothing.
        (Profile, keys.PROFILE_KEY_V1, {"controls"}),
        (JobSpec, keys.CONTENT_KEY_V1, set()),
        (JobSpec, keys.RENDER_KEY_V1, NOT_IN_RENDER_KEY | {"control"}),  # V2 is the key of jobs with controls
        (JobSpec, keys.RENDER_KEY_V2, NOT_IN_RENDER_KEY),
    ],
)
def test_every_field_is_hashed_or_deliberately_left_out(cls, key_fields, left_out):
    listed = {f.name for f in key_fields}
    assert {f.name for f in fields(cls)} == listed | left_out
    assert not listed & left_out


def test_a_manifest_names_the_model_by_the_identity_list(tmp_path, monkeypatch):
    from lcmq.manifest import model_identity
    from lcmq.profiles import reset_profiles

    monkeypatch.setenv("LCMQ_CONFIG", str(tmp_path / "absent.toml"))
    reset_profiles()
    assert model_identity("tiny") == keys.model_identity(TINY)
    assert model_identity("no-such-profile") == {"family": None, "base": None, "lcm_lora": None, "dtype": None}


# --- controls: a new render key version (V2) for jobs with controls; V1 stays for the rest -----

EDGES = {
    "name": "edges",
    "type": "controlnet",
    "model": "/models/canny",
    "image": "s3://b/edges/1.png",
    "scale": 0.8,
    "preprocess": "canny",
    "start": 0.0,
    "end": 1.0,
    "low": 100.0,
    "high": 200.0,
}
CONTROL_SPEC = JobSpec(0, "a red fox", "", 42, 4, 1.0, 64, 64, control=(EDGES,))
IMAGE_SHA = "a" * 64
CONTROL_RENDER_KEY = "2fdfe6e420190adce4cca8dbd6c16d698fbbbb23d132f06ef697d3dc4a32ce34"
CONTROL_CONTENT_HASH = "94721421e4a0da4e889e66b0609decf74d47929f8c33c5a5562248064c1ef35c"
CONTROL_IDEMPOTENCY_KEY = "64d12e03793137c0ef1a815b6edadeb8a031b1f735c9b82515b554b9248453df"


def test_control_keys_are_pinned():
    assert keys.render_key(CONTROL_SPEC, TINY, "png", [IMAGE_SHA]) == CONTROL_RENDER_KEY
    assert keys.content_sha256([CONTROL_SPEC]) == CONTROL_CONTENT_HASH
    options = BatchOptions(model="tiny", controls=({"name": "edges", "image": "e.png"},))
    assert keys.idempotency_key(CONTENT, options, TINY, CHUNK_SIZE) == CONTROL_IDEMPOTENCY_KEY


def test_a_control_render_key_follows_the_image_bytes_not_its_url():
    key = keys.render_key(CONTROL_SPEC, TINY, "png", [IMAGE_SHA])
    moved = replace(CONTROL_SPEC, control=(EDGES | {"image": "file:///elsewhere/1.png"},))
    assert keys.render_key(moved, TINY, "png", [IMAGE_SHA]) == key
    assert keys.render_key(CONTROL_SPEC, TINY, "png", ["b" * 64]) != key
    assert keys.render_key(replace(CONTROL_SPEC, control=(EDGES | {"scale": 0.5},)), TINY, "png", [IMAGE_SHA]) != key
    # Without controls the key is V1's, whatever the caller passes.
    assert keys.render_key(SPECS["plain"], TINY, "png", None) == RENDER_KEYS["plain", "tiny", "png"]
    with pytest.raises(ValueError):
        keys.render_key(CONTROL_SPEC, TINY, "png")
