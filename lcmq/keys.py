"""The keys that find earlier work, each built from an explicit, versioned list of fields.

- the idempotency key: a resubmitted batch (same content, options, profile, chunk size) finds
  the batch it already made instead of rendering it again;
- the render key: a catalog run re-renders only the items whose key changed;
- the content hash of rows given as objects (`lcmq.submit([...])`), part of the idempotency key;
- the model identity each manifest record carries.

Stored keys must never change, so no key hashes "every field of a dataclass": adding a field to
BatchOptions, JobSpec or Profile changes no key until it is listed here. A field listed after
keys were first stored gets `absent` values: while it holds one, it is left out of the hash, so
the inputs that existed before it keep their keys (tests/unit/test_keys.py pins hex values).
A change that must change keys is a new list (…_V2) whose version goes into the hash; V1 hashes
no version because its keys were stored before there were versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the contract's dataclasses; keys only read their attributes
    from lcmq.profiles import Profile
    from lcmq.spec import BatchOptions, JobSpec


@dataclass(frozen=True)
class KeyField:
    """One field a key hashes, read by name from its object.

    While the field named by `absent_while` (this one unless given) holds one of the `absent`
    values, this field is left out. None: always hashed.
    """

    name: str
    absent: tuple[Any, ...] | None = None
    absent_while: str | None = None

    def hashed(self, source: Any) -> bool:
        if self.absent is None:
            return True
        return getattr(source, self.absent_while or self.name) not in self.absent


def _pick(source: Any, key_fields: tuple[KeyField, ...]) -> dict[str, Any]:
    return {f.name: getattr(source, f.name) for f in key_fields if f.hashed(source)}


def _sha256_json(value: Any, **dumps_options: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, **dumps_options).encode()).hexdigest()


# PNG is written here, not taken from lcmq.formats: a change of the default format must not change
# stored keys.
_PNG = "png"

# What a profile contributes to the idempotency key and the render key. The fields from `config`
# on came after the first keys; each is hashed only when set.
PROFILE_KEY_V1: tuple[KeyField, ...] = (
    KeyField("name"),
    KeyField("family"),
    KeyField("base"),
    KeyField("lcm_lora"),
    KeyField("dtype"),
    KeyField("width"),
    KeyField("height"),
    KeyField("steps"),
    KeyField("guidance"),
    KeyField("config", absent=(None,)),
    KeyField("vae", absent=(None,)),
    KeyField("attention_slicing", absent=(False,)),
    KeyField("vae_tiling", absent=(False,)),
    KeyField("vae_slicing", absent=(False,)),
    KeyField("cpu_offload", absent=(False,)),
    KeyField("loras", absent=((),)),
    # OpenVINO's pixels differ from torch's in the last bits: an openvino profile is its own model.
    KeyField("runtime", absent=("torch",)),
    # A tiny VAE decodes other pixels: its profile re-renders; full-VAE profiles keep their keys.
    KeyField("vae_decoder", absent=("full",)),
    KeyField("tiny_vae", absent=(None,)),
)

# The batch options in the idempotency key. PNG batches, batches without a matrix and batches
# without --lora keep the keys they had before formats, matrices and style LoRAs. `loras=()`
# (an explicit "no LoRA") is not absent: it differs from None (the profile's LoRAs).
IDEMPOTENCY_KEY_V1: tuple[KeyField, ...] = (
    KeyField("model"),
    KeyField("steps"),
    KeyField("guidance"),
    KeyField("negative_prompt"),
    KeyField("width"),
    KeyField("height"),
    KeyField("seed"),
    KeyField("name"),
    KeyField("image_format", absent=(_PNG,)),
    KeyField("quality", absent=(_PNG,), absent_while="image_format"),
    KeyField("matrix", absent=((), [], None)),
    KeyField("loras", absent=(None,)),
    KeyField("controls", absent=(None,)),
)

# A job's fields in its catalog item's render key: what decides its pixels, not its index, row or
# metadata. Style LoRAs and img2img came later; absent ones leave older items' keys unchanged.
RENDER_KEY_V1: tuple[KeyField, ...] = (
    KeyField("prompt"),
    KeyField("negative_prompt"),
    KeyField("steps"),
    KeyField("guidance"),
    KeyField("width"),
    KeyField("height"),
    KeyField("seed"),
    KeyField("loras", absent=((), [])),
    KeyField("init_image", absent=(None, "")),
    KeyField("strength", absent=(None, 0)),
)

# The render key of a job with controls: V1's fields and the control set (models, scales,
# start/end, preprocessing; not the images' URLs), with the sha256 of each control image's bytes
# beside it, so a changed image re-renders its item and a moved one does not. Jobs without
# controls keep V1 (their keys never change); V2's own keys carry their version.
RENDER_KEY_V2: tuple[KeyField, ...] = (*RENDER_KEY_V1, KeyField("control"))
_CONTROL_URL_FIELDS = ("image", "upload")

# A job's fields in the content hash of rows given as objects: every field JobSpec had when it was
# first stored, always hashed.
CONTENT_KEY_V1: tuple[KeyField, ...] = (
    KeyField("index"),
    KeyField("prompt"),
    KeyField("negative_prompt"),
    KeyField("seed"),
    KeyField("steps"),
    KeyField("guidance"),
    KeyField("width"),
    KeyField("height"),
    KeyField("metadata"),
    KeyField("row"),
    KeyField("loras"),
    KeyField("init_image"),
    KeyField("strength"),
    KeyField("upload_init"),
    KeyField("control", absent=((),)),
)

# The model a manifest record names: what a reader needs to reproduce the image's model.
MODEL_IDENTITY_V1: tuple[KeyField, ...] = (
    KeyField("family"),
    KeyField("base"),
    KeyField("lcm_lora"),
    KeyField("dtype"),
    KeyField("runtime", absent=("torch",)),  # named where it is not torch: torch records stay as they were
    # Which VAE made the pixels, where it was not the model's own: records of a tiny-VAE profile
    # name it; the others read as before.
    KeyField("vae_decoder", absent=("full",)),
    KeyField("tiny_vae", absent=(None,)),
)


def profile_identity(profile: Profile) -> dict[str, Any]:
    """The profile as the idempotency and render keys hash it."""
    return _pick(profile, PROFILE_KEY_V1)


def content_sha256(specs: Iterable[JobSpec]) -> str:
    """The content hash of validated rows given as objects (a file's is its bytes' hash)."""
    return _sha256_json([_pick(spec, CONTENT_KEY_V1) for spec in specs], default=str)


def idempotency_key(content: str, options: BatchOptions, profile: Profile, chunk_size: int) -> str:
    """The same content, options, profile and chunk size give the same key: a resubmission is found."""
    parts = {
        "content": content,
        "options": _pick(options, IDEMPOTENCY_KEY_V1),
        "profile": profile_identity(profile),
        "chunk_size": chunk_size,
    }
    return _sha256_json(parts, default=str)


def render_key(spec: JobSpec, profile: Profile, output_format: str, control_sha256: Sequence[str] | None = None) -> str:
    """A hash of what decides a catalog item's image: its job's fields, the profile (model and LoRA
    identity) and the output format ("png", or "webp:85": a quality change re-renders). A job
    with controls needs `control_sha256`: each control image's sha256, in the order of its set."""
    if not spec.control:
        parts = _pick(spec, RENDER_KEY_V1) | {"profile": profile_identity(profile), "format": output_format}
        return _sha256_json(parts)
    if control_sha256 is None or len(control_sha256) != len(spec.control):
        raise ValueError("a render key of a job with controls needs each control image's sha256")
    picked = _pick(spec, RENDER_KEY_V2)
    picked["control"] = [
        {k: v for k, v in entry.items() if k not in _CONTROL_URL_FIELDS} | {"image_sha256": digest}
        for entry, digest in zip(spec.control, control_sha256, strict=True)
    ]
    parts = picked | {"profile": profile_identity(profile), "format": output_format, "version": 2}
    return _sha256_json(parts)


def model_identity(profile: Profile) -> dict[str, Any]:
    """The model a manifest record names."""
    return _pick(profile, MODEL_IDENTITY_V1)


def owned_idempotency_key(owner: str | None, key: str) -> str:
    """An idempotency key in its owner's own space: two API keys that send the same body (or the
    same Idempotency-Key header) get two batches, never each other's. The local caller's keys
    (owner None) stay as they were, so resubmissions made before API keys existed still match."""
    if owner is None:
        return key
    return _sha256_json({"owner": owner, "key": key})
