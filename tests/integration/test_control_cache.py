"""The worker's control models: loaded through the user path (save_pretrained folders, a single
file with its config), kept in a bounded LRU, refused when the job names the wrong kind."""

from __future__ import annotations

import pytest

from worker.control import ControlCache, ControlLoadError


def _entry(name: str, path, kind: str = "controlnet", config=None) -> dict:
    entry = {"name": name, "type": kind, "model": str(path), "scale": 1.0, "start": 0.0, "end": 1.0}
    return entry | ({"config": str(config)} if config else {})


def test_the_lru_keeps_at_most_its_bound_and_refuses_the_wrong_kind(models_dir, tmp_path):
    import torch

    from worker.generated import ensure_generated, generate_control, single_file_control

    model_dir, _ = ensure_generated("tiny-sd15", models_dir)
    edges = generate_control(model_dir, tmp_path / "edges", "controlnet", seed=1)
    depth = generate_control(model_dir, tmp_path / "depth", "controlnet", seed=2)
    sketch = generate_control(model_dir, tmp_path / "sketch", "t2i_adapter", seed=3)
    lines = single_file_control(edges, tmp_path / "lines.safetensors")
    cache = ControlCache(pipe=object(), capacity=2, device="cpu", dtype=torch.float32)

    (first,) = cache.models([_entry("edges", edges)])
    assert type(first).__name__ == "ControlNetModel"
    assert cache.models([_entry("edges", edges)])[0] is first  # loaded once
    cache.models([_entry("depth", depth)])
    (adapter,) = cache.models([_entry("sketch", sketch, "t2i_adapter")])
    assert type(adapter).__name__ == "T2IAdapter"
    assert [key[1] for key in cache.loaded] == [str(depth), str(sketch)]  # edges, least recent, left
    # A set larger than the bound is loaded whole: it is one call's need.
    assert len(cache.models([_entry("edges", edges), _entry("lines", lines, config=edges)])) == 2
    single = cache.loaded["controlnet", str(lines), str(edges)]
    assert all(
        torch.equal(a, b) for a, b in zip(single.state_dict().values(), first.state_dict().values(), strict=True)
    )

    with pytest.raises(ControlLoadError, match="is a T2IAdapter, but the job says controlnet"):
        cache.models([_entry("sketch", sketch, "controlnet")])
    with pytest.raises(ControlLoadError, match="no readable config.json"):
        cache.models([_entry("gone", tmp_path / "gone")])
