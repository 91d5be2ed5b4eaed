"""The cost of a ControlNet: images/s with and without one, side by side in one run, through the
worker's own render path (`worker.render.render`: the pinned pipeline, and for (B) the ControlNet
from the worker's LRU with a `from_pipe` pipeline and a canny control image per job).

    .venv/bin/python bench/control.py --model sd15-arch --images 8 --rounds 2

(A) plain: text2img micro-batches of `--batch-size` at 256².
(B) control: the same prompts, seeds and batches, each job with a ControlNet (`from_unet` of the
    model's UNet, generated and saved beside it) and its canny-preprocessed control image.
Rounds alternate A B A B; the best round of each counts. Control images are read and
preprocessed inside (B)'s timed window, as a worker does. Last line:
`ratio=… control_img_s=… plain_img_s=…` (ratio = B/A).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def jobs(n: int, size: int, steps: int, control: list | None):
    from lcmq.repository import JobRecord

    base = JobRecord(
        id="",
        batch_id="bench",
        index=0,
        state="running",
        prompt="",
        negative_prompt="",
        seed=0,
        steps=steps,
        guidance=1.0,
        width=size,
        height=size,
        meta={},
        attempts=1,
        worker="bench",
        error=None,
        key=None,
        sha256=None,
        render_ms=None,
        batch_size=None,
        warning=None,
        dispatched_at=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        control=control,
    )
    return [replace(base, id=f"j{i}", index=i, seed=i, prompt=f"a product photo of item {i}") for i in range(n)]


def run(loaded, settings, texts, batch_size: int) -> float:
    from worker.control import load_control_images
    from worker.render import render

    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        group = texts[start : start + batch_size]
        ready, images, bad = load_control_images(group, settings)
        assert not bad, bad
        render(loaded, ready, None, images)
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-arch", choices=["tiny", "sd15-arch"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    models = Path(os.environ.get("LCMQ_MODELS_DIR", str(Path(".lcmq/models").resolve())))
    os.environ["LCMQ_MODELS_DIR"] = str(models)
    from PIL import Image, ImageDraw

    from lcmq.profiles import get_profile
    from lcmq.settings import get_settings
    from worker.generated import ensure_generated, generate_control
    from worker.pipeline import load_pipeline

    generated = {"tiny": "tiny-sd15", "sd15-arch": "sd15-arch"}[args.model]
    model_dir, _ = ensure_generated(generated, models)
    controlnet = generate_control(model_dir, models / generated / "controlnet-canny", "controlnet", seed=1)
    work = Path(tempfile.mkdtemp(prefix="lcmq-control-"))
    shape = Image.new("RGB", (args.size, args.size), (90, 90, 90))
    ImageDraw.Draw(shape).rectangle(
        (args.size // 6, args.size // 6, args.size * 5 // 6, args.size * 2 // 3), outline=(255, 255, 255), width=4
    )
    shape.save(work / "shape.png")
    entry = {
        "name": "canny",
        "type": "controlnet",
        "model": str(controlnet),
        "image": f"file://{work / 'shape.png'}",
        "scale": 1.0,
        "preprocess": "canny",
        "start": 0.0,
        "end": 1.0,
        "low": 100.0,
        "high": 200.0,
    }
    settings = get_settings()
    loaded = load_pipeline(get_profile(args.model), settings)
    plain_jobs = jobs(args.images, args.size, args.steps, None)
    control_jobs = jobs(args.images, args.size, args.steps, [entry])
    # Warm both paths (the ControlNet loads into the worker's LRU here, outside the timing).
    run(loaded, settings, plain_jobs[: args.batch_size], args.batch_size)
    run(loaded, settings, control_jobs[: args.batch_size], args.batch_size)
    plain, control = [], []
    for round_no in range(args.rounds):
        plain.append(run(loaded, settings, plain_jobs, args.batch_size))
        control.append(run(loaded, settings, control_jobs, args.batch_size))
        print(f"round {round_no}: plain_img_s={plain[-1]:.3f} control_img_s={control[-1]:.3f}", file=sys.stderr)
    print(
        f"ratio={max(control) / max(plain):.3f} control_img_s={max(control):.3f} plain_img_s={max(plain):.3f} "
        f"model={args.model} size={args.size} images={args.images} batch_size={args.batch_size} rounds={args.rounds}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
