"""Control fields without services: validation at submit (file, line and field named), the
--control flag, profiles' [controls], render shapes and micro-batches, the control_scale axes,
the parameters text, canny, and the worker's pipeline plan."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import job_record
from PIL import Image, ImageDraw

from lcmq.controls import ControlProblem, control_key, describe, parse_control_flag
from lcmq.errors import InputError, ProfileError
from lcmq.matrix import check_matrix, expand
from lcmq.profiles import BUILTIN_PROFILES, load_profiles, reset_profiles
from lcmq.spec import BatchOptions, RowValidator, read_rows, validate_rows
from scheduler.batches import job_row
from worker.control import ControlLoadError, call_images, canny, plan_call
from worker.encode import parameters_text
from worker.render import micro_batches


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "edges").mkdir()
    (tmp_path / "edges" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (tmp_path / "sketch").mkdir()
    (tmp_path / "sketch" / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    return tmp_path


def profile(folder: Path):
    controls = (
        {"name": "edges", "path": str(folder / "edges")},
        {"name": "sketch", "path": str(folder / "sketch")},
        {"name": "hub", "path": "someone/controlnet-depth"},
    )
    return replace(BUILTIN_PROFILES["tiny"], controls=controls)


def load(folder: Path, rows: list[dict], **flags):
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validator = RowValidator(BatchOptions(model="tiny", **flags), profile(folder), str(path), base_dir=folder)
    return validate_rows(read_rows(path), validator)


def refused(folder: Path, rows: list[dict], **flags) -> InputError:
    with pytest.raises(InputError) as caught:
        load(folder, rows, **flags)
    return caught.value


def test_a_row_control_is_canonical_sorted_and_typed_by_the_model_config(files):
    (spec,) = load(
        files,
        [
            {
                "prompt": "a chair",
                "control": [
                    {"name": "hub", "image": "s3://b/depth.png", "start": 0.1},
                    {"name": "edges", "image": "a.png", "preprocess": "canny"},
                ],
            }
        ],
    )
    edges, hub = spec.control
    assert edges == {
        "name": "edges",
        "type": "controlnet",
        "model": str(files / "edges"),
        "image": f"file://{files / 'a.png'}",
        "scale": 1.0,
        "preprocess": "canny",
        "start": 0.0,
        "end": 1.0,
        "low": 100.0,
        "high": 200.0,
        "upload": True,
    }
    assert hub["type"] == "controlnet" and hub["image"] == "s3://b/depth.png" and "upload" not in hub
    row = job_row("j1", spec, 0)
    assert all("upload" not in entry for entry in row["control"])  # the producer's mark stays behind


def test_an_adapter_defaults_to_scale_0_8_and_the_flag_fills_rows_without_their_own(files):
    specs = load(
        files,
        [
            {"prompt": "a"},
            {"prompt": "b", "control": []},
            {"prompt": "c", "control": [{"name": "sketch", "image": "b.png"}]},
        ],
        controls=({"name": "edges", "image": str(files / "a.png"), "scale": 0.5},),
    )
    assert specs[0].control[0]["name"] == "edges" and specs[0].control[0]["scale"] == 0.5
    assert specs[1].control == ()
    assert specs[2].control[0]["type"] == "t2i_adapter" and specs[2].control[0]["scale"] == 0.8


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ([{"name": "pose", "image": "a.png"}], "pose: no control model of that name in the profile"),
        ([{"name": "edges", "image": "a.png", "scale": 2.5}], "edges: scale must be between 0 and 2 (got 2.5)"),
        ([{"name": "edges", "image": "missing.png"}], "no such file"),
        ([{"name": "edges", "image": "a.png", "preprocess": "depth"}], "preprocess must be one of none, canny"),
        ([{"name": "edges", "image": "a.png", "start": 0.6, "end": 0.5}], "start (0.6) must be below end (0.5)"),
        ([{"name": "edges", "image": "a.png", "type": "t2i_adapter"}], "is a controlnet"),
        ([{"name": "edges", "image": "a.png", "low": 10}], "set preprocess to canny"),
        ([{"name": "edges", "image": "a.png"}, {"name": "edges", "image": "b.png"}], "'edges' given twice"),
        ([{"name": "edges", "image": "a.png"}, {"name": "sketch", "image": "b.png"}], "cannot be mixed"),
        ([{"name": "sketch", "image": "a.png", "end": 0.5}], "start and end apply to ControlNets only"),
        ({"name": "edges"}, "must be a list"),
        ([{"name": "edges", "image": "a.png", "weight": 1}], "unknown key(s) weight"),
    ],
)
def test_bad_controls_are_refused_with_file_line_and_field(files, control, message):
    error = refused(files, [{"prompt": "ok"}, {"prompt": "a chair", "control": control}])
    assert (error.line, error.field) == (2, "control")
    assert message in str(error), str(error)


def test_an_adapter_with_img2img_and_a_bad_flag_are_refused(files):
    error = refused(files, [{"prompt": "a", "init_image": "a.png", "control": [{"name": "sketch", "image": "b.png"}]}])
    assert error.field == "control" and "T2I-Adapters do not run with img2img" in str(error)
    error = refused(files, [{"prompt": "a"}], controls=({"name": "nope", "image": "a.png"},))
    assert (error.line, error.field) == (None, "--control")


def test_csv_cells_hold_json(files):
    path = files / "batch.csv"
    path.write_text('prompt,control\na chair,"[{""name"": ""edges"", ""image"": ""a.png"", ""scale"": ""0.4""}]"\n')
    validator = RowValidator(BatchOptions(model="tiny"), profile(files), str(path), base_dir=files)
    (spec,) = validate_rows(read_rows(path), validator, from_text=True)
    assert spec.control[0]["scale"] == 0.4


def test_the_control_flag():
    assert parse_control_flag("edges=shape.png:0.7") == {"name": "edges", "image": "shape.png", "scale": 0.7}
    assert parse_control_flag("edges=s3://b/k.png") == {"name": "edges", "image": "s3://b/k.png"}
    with pytest.raises(ControlProblem):
        parse_control_flag("edges")


def test_profiles_declare_controls(tmp_path, monkeypatch):
    config = tmp_path / "lcmq.toml"
    config.write_text(
        "[profiles.tiny.controls]\n"
        'edges = "./cn/edges"\n'
        'lines = { path = "/m/lines.safetensors", config = "/m/lines" }\n'
    )
    reset_profiles()
    tiny = load_profiles(config)["tiny"]
    assert tiny.control_models == {
        "edges": {"name": "edges", "path": str((tmp_path / "cn" / "edges").resolve())},
        "lines": {"name": "lines", "path": "/m/lines.safetensors", "config": "/m/lines"},
    }
    assert tiny.to_dict()["controls"] == tiny.controls
    config.write_text('[profiles.tiny.controls]\nedges = { file = "x" }\n')
    reset_profiles()
    with pytest.raises(ProfileError, match=r"\[profiles.tiny\].controls.edges"):
        load_profiles(config)
    reset_profiles()


def test_the_control_set_is_part_of_the_render_shape_but_not_its_images(files):
    a, b, c, d = load(
        files,
        [
            {"prompt": "a", "control": [{"name": "edges", "image": "a.png"}]},
            {"prompt": "b", "control": [{"name": "edges", "image": "b.png"}]},
            {"prompt": "c", "control": [{"name": "edges", "image": "a.png", "scale": 0.5}]},
            {"prompt": "d"},
        ],
    )
    assert a.render_shape == b.render_shape != c.render_shape != d.render_shape
    jobs = [job_record(i, control=[dict(e) for e in s.control] or None) for i, s in enumerate((a, b, c, d))]
    assert [[j.index for j in group] for group in micro_batches(jobs, 8)] == [[0, 1], [2], [3]]
    assert control_key(None) == control_key([]) == ""


def test_control_scale_axes(files):
    specs = load(
        files, [{"prompt": "a", "control": [{"name": "edges", "image": "a.png"}, {"name": "hub", "image": "b.png"}]}]
    )
    cells = list(expand(specs, check_matrix({"control_scale.hub": ["0", "0.5"]}), "<m>"))
    assert [[e["scale"] for e in cell.control] for cell in cells] == [[1.0, 0.0], [1.0, 0.5]]
    cells = list(expand(specs, check_matrix({"control_scale": ["0.3"]}), "<m>"))
    assert [e["scale"] for e in cells[0].control] == [0.3, 0.3]
    with pytest.raises(InputError, match="between 0 and 2"):
        check_matrix({"control_scale": ["3"]})
    with pytest.raises(InputError, match="no control named 'pose'"):
        list(expand(specs, check_matrix({"control_scale.pose": ["1"]}), "<m>"))


def test_the_parameters_text_names_each_control(files):
    (spec,) = load(
        files,
        [{"prompt": "a chair", "control": [{"name": "edges", "image": "a.png", "preprocess": "canny", "scale": 0.8}]}],
    )
    job = job_record(0, control=list(spec.control))
    text = parameters_text(job, "tiny")
    assert text.endswith(
        'Model: tiny, ControlNet 0: "Module: canny, Model: edges, Weight: 0.8, Guidance Start: 0, '
        'Guidance End: 1, Threshold A: 100, Threshold B: 200"'
    )
    assert describe(None) is None and "ControlNet" not in parameters_text(job_record(0), "tiny")


def test_canny_finds_the_outline_of_a_shape_and_nothing_in_flat_areas():
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(250, 250, 250))
    edges = np.asarray(canny(image, 100, 200))[..., 0]
    assert edges.shape == (64, 64) and set(np.unique(edges)) <= {0, 255}
    assert edges[16:48, 15:17].any() and edges[16:48, 47:49].any()  # the left and right sides
    assert not edges[:10].any() and not edges[24:40, 24:40].any()  # flat areas: no edges
    assert edges.sum() // 255 < 4 * 34 * 2  # thin lines, not bands
    weak = np.asarray(canny(image, 100, 5000))[..., 0]
    assert not weak.any()  # nothing reaches the high threshold: hysteresis keeps nothing


def test_the_pipeline_plan_by_family_kind_and_img2img():
    cn = [{"type": "controlnet", "scale": 0.7, "start": 0.0, "end": 0.5}]
    two = cn + [{"type": "controlnet", "scale": 1.0, "start": 0.1, "end": 1.0}]
    assert plan_call("sd15", cn, False).pipeline_class == "StableDiffusionControlNetPipeline"
    assert plan_call("sd15", cn, True).pipeline_class == "StableDiffusionControlNetImg2ImgPipeline"
    assert plan_call("ssd1b", cn, True).pipeline_class == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert plan_call("sdxl", two, False).kwargs == {
        "controlnet_conditioning_scale": [0.7, 1.0],
        "control_guidance_start": [0.0, 0.1],
        "control_guidance_end": [0.5, 1.0],
    }
    adapter = [{"type": "t2i_adapter", "scale": 0.8, "start": 0.0, "end": 1.0}]
    assert plan_call("sdxl", adapter, False).kwargs == {"adapter_conditioning_scale": 0.8}
    with pytest.raises(ControlLoadError):
        plan_call("sd15", adapter, True)


def test_call_images_per_control():
    a, b, c, d = (Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 64, 128, 255))
    assert call_images([[a], [b]], "controlnet") == [a, b]
    assert call_images([[a, b], [c, d]], "t2i_adapter") == [[a, c], [b, d]]
    tensors = call_images([[a, b], [c, d]], "controlnet")
    assert [tuple(t.shape) for t in tensors] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    assert float(tensors[1][1].max()) == 1.0
