"""What tracing only the live rays saves SolidWorld's renderer, measured interleaved in one run.

Run: ``python -m benchmarks.render_speed [--quick] [--threads N]``.

SolidWorld draws every ground-truth view set, every evaluator template and every `solid-*` reward's
reference by sphere tracing (``reference_impls/worlds/solid.py``). The plain tracer advances every ray for
all ``MARCH_STEPS`` steps; ``_march`` advances only the rays still travelling, since a ray that has hit
something or left the scene never changes again. Cases, on the same rays of one batch of scenes (the
ground-truth layouts of held-out prompts, 4 views of 32x32 each):

* ``trace_every_ray``: the plain tracer (``_march_every_ray``, kept as the reference);
* ``trace_live_rays``: the renderer's tracer (``_march``);
* ``render_scenes``: the whole render, live-ray tracing plus colouring and shading (normals by finite
  differences), to show what share of a render the tracing is now.

Reported as ratios in one run: every-ray / live-ray tracing (the speed-up), and the whole render over its
live-ray tracing. Before timing, the benchmark checks that both tracers give the same hit mask and the same
surface points, so the ratio compares two ways of computing one image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import machine_description, print_timings_and_ratios, time_interleaved, write_results
from reference_impls.worlds import solid

SCENES = 48


def held_out_scenes(count: int) -> list[list[solid.PlacedSolid]]:
    """Ground-truth layouts of ``count`` held-out prompts spread over the split, each from its own seed."""
    prompts = solid.solid_prompt_split("heldout")
    picked = [prompts[i] for i in np.linspace(0, len(prompts) - 1, count).round().astype(int)]
    return [solid.layout_scene(p, np.random.default_rng([11, i])) for i, p in enumerate(picked)]


def measure(repeats: int, count: int) -> dict:
    scenes = held_out_scenes(count)
    scene = solid._scene_tensors(scenes)
    origins, directions, scene_of_point, _ = solid._rays(len(scenes), solid.DEFAULT_SIZE)

    live_points, live_hit = solid._march(origins, directions, scene_of_point, scene)
    every_points, every_hit = solid._march_every_ray(origins, directions, scene_of_point, scene)
    # Rays that miss end at different places (the fast tracer stops them past MARCH_FAR); they show background.
    if not (torch.equal(live_hit, every_hit) and torch.equal(live_points[live_hit], every_points[every_hit])):
        raise AssertionError("the live-ray tracer and the plain tracer disagree: the ratio would compare two images")

    fns = {
        "trace_every_ray": lambda: solid._march_every_ray(origins, directions, scene_of_point, scene),
        "trace_live_rays": lambda: solid._march(origins, directions, scene_of_point, scene),
        "render_scenes": lambda: solid.render_scenes(scenes),
    }
    timings = time_interleaved(fns, repeats=repeats, warmup=1)
    median = {name: t.median for name, t in timings.items()}
    return {
        "scenes": len(scenes), "views": int(origins.shape[0] // (len(scenes) * solid.DEFAULT_SIZE ** 2)),
        "size": solid.DEFAULT_SIZE, "march_steps": solid.MARCH_STEPS, "rays": int(origins.shape[0]),
        "hit_fraction": float(live_hit.float().mean()),
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ratios": {
            "trace_every_ray_over_live_rays": median["trace_every_ray"] / median["trace_live_rays"],
            "render_over_live_ray_tracing": median["render_scenes"] / median["trace_live_rays"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats of 8 scenes instead of 7 of 48; writes nothing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(3 if args.quick else 7, 8 if args.quick else SCENES)
    result["machine"] = machine_description()
    result["threads"] = args.threads
    print_timings_and_ratios(result)
    if not args.quick:
        write_results("render_speed", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
