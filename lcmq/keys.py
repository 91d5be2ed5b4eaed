"""The keys that find earlier work (step 0: the logic moved here unchanged, to pin it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from lcmq.profiles import Profile
from lcmq.spec import BatchOptions, JobSpec


def content_sha256(specs: Iterable[JobSpec]) -> str:
    return hashlib.sha256(json.dumps([asdict(spec) for spec in specs], sort_keys=True,
                                     default=str).encode()).hexdigest()


def idempotency_key(content: str, options: BatchOptions, profile: Profile, chunk_size: int) -> str:
    opts = asdict(options)
    if opts["image_format"] == "png":
        del opts["image_format"], opts["quality"]
    if not opts["matrix"]:
        del opts["matrix"]
    if opts["loras"] is None:
        del opts["loras"]
    parts = {"content": content, "options": opts, "profile": profile.to_dict(), "chunk_size": chunk_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def render_key(spec: JobSpec, profile: Profile, output_format: str) -> str:
    parts = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "profile": profile.to_dict(),
             "steps": spec.steps, "guidance": spec.guidance, "width": spec.width, "height": spec.height,
             "seed": spec.seed, "format": output_format}
    parts |= {k: v for k, v in (("loras", list(spec.loras)), ("init_image", spec.init_image),
                                ("strength", spec.strength)) if v}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def model_identity(profile: Profile) -> dict[str, Any]:
    data = profile.to_dict()
    return {key: data[key] for key in ("family", "base", "lcm_lora", "dtype")}
