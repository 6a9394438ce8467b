"""Subcommands that need torch: pretrain, sample, eval, train, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from reference_impls.cli import UsageError

if TYPE_CHECKING:
    from reference_impls.models import GenerativePolicy
    from reference_impls.sampling import SamplerConfig

INFLATE_DEFAULT = {"flow": "shapes-flow-clip", "diffusion": "shapes-diffusion"}
"""The image model ``rlvg pretrain --world motion|solid`` inflates by default: the one the shipped motion and
solid models were made from (``shapes-flow-clip``; the T5-encoder ``shapes-flow`` came later)."""


def _set_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


def _load(model: str, device: str = "cpu"):  # noqa: ANN202
    from reference_impls.models.loading import ModelNotFoundError, load_policy

    try:
        return load_policy(model, device=device)
    except ModelNotFoundError as error:
        raise UsageError(str(error)) from None


# -- pretrain -------------------------------------------------------------------------------------
def _cmd_pretrain(args: argparse.Namespace) -> int:
    from reference_impls.models.components import TinyModelConfig
    from reference_impls.models.pretrain import WORLDS, PretrainConfig, pretrain

    if args.world not in WORLDS:
        raise UsageError(f"unknown world {args.world!r}; valid worlds: {', '.join(WORLDS)}")
    _set_threads(args.threads)
    config = PretrainConfig(kind=args.model, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                            seed=args.seed, learning_rate=args.learning_rate, init_from=args.init_from,
                            stop_after=args.stop_after, prompts=args.prompts, save_every=args.save_every,
                            time_shift=args.time_shift, world=args.world, frames=args.frames,
                            # the shipped video and multi-view models were inflated from the CLIP-encoder base
                            inflate_from=args.inflate_from or INFLATE_DEFAULT[args.model],
                            text_encoder_from=args.text_encoder_from)
    from reference_impls.worlds.registry import get_world

    prompt_split = get_world(args.world).prompt_split
    if args.world == "motion" and not 2 <= args.frames <= 16:
        raise UsageError(f"--frames {args.frames}: a motion model takes 2 to 16 frames")
    if args.world != "shapes" and args.coordinate_channels:
        raise UsageError("--coordinate-channels applies to --world shapes only")

    if args.time_shift <= 0 or (args.time_shift != 1.0 and args.model != "flow"):
        raise UsageError(f"--time-shift {args.time_shift}: must be > 0, and applies to --model flow only")
    for name in args.prompts.split(","):
        try:
            prompt_split(name.strip())
        except ValueError as error:
            raise UsageError(f"--prompts {args.prompts}: {error}") from None
    if args.init_from and not Path(args.init_from).is_dir():
        raise UsageError(f"--init-from {args.init_from}: no such checkpoint folder")
    command = "rlvg " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("rlvg") else ""
    model_config = TinyModelConfig(coordinate_channels=args.coordinate_channels)
    if args.world != "shapes" and not args.init_from:  # a 5-D model keeps the image model's sizes
        from reference_impls.models.loading import ModelNotFoundError, resolve_model_dir

        try:
            model_config = _saved_model_config(resolve_model_dir(config.inflate_from))
        except ModelNotFoundError as error:
            raise UsageError(f"--inflate-from: {error}") from None
    if args.text_encoder_from:
        from reference_impls.models.text_pretrain import TEXT_CONFIG

        folder = Path(args.text_encoder_from)
        if args.world != "shapes":
            raise UsageError("--text-encoder-from applies to --world shapes only")
        if not (folder / TEXT_CONFIG).is_file():
            raise UsageError(f"--text-encoder-from {folder}: not a text encoder folder (no {TEXT_CONFIG}); make one "
                             "with python -m reference_impls.models.text_pretrain --out DIR")
        saved = json.loads((folder / TEXT_CONFIG).read_text(encoding="utf-8"))
        model_config = TinyModelConfig(**{**saved, "block_out_channels": tuple(saved["block_out_channels"]),
                                          "coordinate_channels": args.coordinate_channels})
    elif args.init_from:  # a continuation keeps the architecture of the checkpoint it starts from
        model_config = _saved_model_config(Path(args.init_from))
        if args.coordinate_channels and not model_config.coordinate_channels:
            raise UsageError(f"--coordinate-channels: {args.init_from} was made without them; "
                             "start from scratch (no --init-from) to add them")
    provenance = pretrain(config, Path(args.out), model_config=model_config, command=command)
    if args.eval_n == 0:
        print(json.dumps({"out": args.out, "steps_done": provenance["steps_done"]}, indent=2))
        return 0
    policy = _load(args.out)
    scores = _heldout_scores(policy, n=args.eval_n)
    provenance["heldout_eval"] = scores
    (Path(args.out) / "provenance.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    print(json.dumps({"out": args.out, "steps_done": provenance["steps_done"], "heldout": scores}, indent=2))
    return 0


def _saved_model_config(folder: Path):  # noqa: ANN202
    from reference_impls.models.components import TinyModelConfig
    from reference_impls.models.shapes_model import MODEL_FILE

    saved = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))["config"]
    return TinyModelConfig(**{**saved, "block_out_channels": tuple(saved["block_out_channels"])})


def _heldout_scores(policy, n: int) -> dict:  # noqa: ANN001
    from reference_impls.evaluation import default_eval_sampler, evaluate_policy, heldout_prompts

    scores = {}
    for steps in (20,):
        prompts = heldout_prompts(n, world=policy.world or "shapes")
        result = evaluate_policy(policy, prompts, default_eval_sampler(policy, steps), seed=0)
        scores[f"{default_eval_sampler(policy, steps).name}{steps}"] = result.metrics
    return scores


# -- sample ---------------------------------------------------------------------------------------
def _cmd_sample(args: argparse.Namespace) -> int:
    from reference_impls.evaluation import save_grid
    from reference_impls.sampling import SamplerConfig, rollout

    _set_threads(args.threads)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    policy = _load(args.model, args.device)
    prompt = args.prompt
    world = _world_of(policy)
    if world is not None:
        try:
            prompt = world.canonical(prompt)
        except world.prompt_error as error:
            raise UsageError(str(error)) from None
    video = world is not None and world.modality == "video" or world is None and len(policy.latent_shape) == 4
    suffixes = (".gif",) if video else (".png",)
    if not args.out.lower().endswith(suffixes):
        kind = "an animated .gif (a frame-strip .png is written beside it)" if video else "a .png file"
        raise UsageError(f"--out must be {kind} for {args.model}, got {args.out}")
    sampler_name = args.sampler or ("ddim" if policy.kind == "diffusion" else "ode")
    try:
        sampler = SamplerConfig(sampler_name, num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale)
        sampler.validate_for(policy.kind)
    except ValueError as error:
        raise UsageError(str(error)) from None
    generator = torch.Generator(device=policy.device).manual_seed(args.seed)
    with torch.no_grad():
        trajectory = rollout(policy, [prompt] * args.n, sampler, generator, progress=True)
    summary = {"out": args.out, "prompt": prompt, "sampler": sampler_name, "n": args.n}
    if video:
        from reference_impls.evaluation import save_gif

        save_gif(trajectory.images, args.out, columns=min(4, args.n), scale=4)
        strip = str(Path(args.out).with_suffix(".png"))
        save_grid(trajectory.images, strip, scale=4)
        summary["frames"] = int(trajectory.images.shape[2])
        summary["strip"] = strip
    else:
        save_grid(trajectory.images, args.out, columns=min(8, args.n), scale=4)
    if world is not None:
        from reference_impls.worlds.registry import to_uint8

        summary["evaluator"] = world.aggregate(world.evaluate(to_uint8(trajectory.images), [prompt] * args.n))
    print(json.dumps(summary, indent=2))
    return 0


def _world_of(policy):  # noqa: ANN001, ANN202
    """The policy's synthetic world, or None for a real checkpoint (any prompt, no exact evaluator)."""
    from reference_impls.worlds.registry import get_world

    return get_world(policy.world) if policy.world else None


# -- eval -----------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    from reference_impls.evaluation import default_eval_sampler, evaluate_policy, heldout_prompts
    from reference_impls.sampling import SamplerConfig

    _set_threads(args.threads)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    policy = _load(args.model, args.device)
    world = _world_of(policy)
    if world is None:
        raise UsageError(f"{args.model} was not pretrained on a synthetic world: rlvg eval needs an exact "
                         "evaluator (ShapeWorld, MotionWorld or SolidWorld models)")
    if args.split not in world.splits:
        raise UsageError(f"unknown split {args.split!r}; valid splits: {', '.join(world.splits)}")
    sampler = default_eval_sampler(policy, args.steps, args.guidance_scale)
    if args.sampler:
        sampler = SamplerConfig(args.sampler, num_steps=args.steps, eta=0.0, guidance_scale=args.guidance_scale)
        try:
            sampler.validate_for(policy.kind)
        except ValueError as error:
            raise UsageError(str(error)) from None
    prompts = heldout_prompts(args.n, split=args.split, world=world.name)
    result = evaluate_policy(policy, prompts, sampler, seed=args.seed)
    report = {"model": args.model, "world": world.name, "split": args.split, "n": args.n, "sampler": sampler.name,
              "steps": args.steps, "seed": args.seed, **result.metrics}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {args.model}  split {args.split}  n={args.n}  sampler {sampler.name}/{args.steps}")
        for key, value in result.metrics.items():
            if key != "n":
                print(f"  {key:<12} {value:.3f}")
    return 0


# -- compare --------------------------------------------------------------------------------------
def _comparison_sampler(base: GenerativePolicy, args: argparse.Namespace) -> SamplerConfig:
    """The deterministic evaluation sampler, or the stochastic one asked for (paired all the same: both
    models consume one seeded generator in the same order, so they draw the same noise at every step)."""
    from reference_impls.evaluation import default_eval_sampler
    from reference_impls.sampling import SAMPLERS_BY_KIND, SamplerConfig

    if args.sampler is None:
        if args.stochastic_steps or args.eta is not None:
            raise UsageError("--stochastic-steps and --eta need --sampler")
        return default_eval_sampler(base, args.steps, args.guidance_scale)
    valid = SAMPLERS_BY_KIND[base.kind]
    if args.sampler not in valid:
        raise UsageError(f"--sampler {args.sampler!r} does not fit a {base.kind} model; valid samplers: "
                         f"{', '.join(valid)}")
    if not 0 <= args.stochastic_steps <= args.steps:
        raise UsageError(f"--stochastic-steps must be between 0 and --steps {args.steps}, got {args.stochastic_steps}")
    window = (0, args.stochastic_steps) if args.stochastic_steps else None
    eta = args.eta if args.eta is not None else (0.0 if args.sampler == "ddim" else 1.0)
    return SamplerConfig(args.sampler, num_steps=args.steps, eta=eta, noise_level=args.noise_level,
                         guidance_scale=args.guidance_scale, stochastic_window=window)


def _cmd_compare(args: argparse.Namespace) -> int:
    from reference_impls.comparison import compare_models, comparison_prompts, format_report
    from reference_impls.rewards import UnknownRewardError, get_reward

    _set_threads(args.threads)
    for name in ("n", "samples_per_prompt", "bootstrap"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.reward:
        try:
            get_reward(args.reward)
        except UnknownRewardError as error:
            raise UsageError(str(error)) from None
    base = _load(args.base, args.device)
    models = [_load(m, args.device) for m in args.model]
    world = _world_of(base)
    for name, policy in [(args.base, base), *zip(args.model, models)]:
        if world is None or policy.world != world.name:
            raise UsageError(f"{name} is a model of world {policy.world!r} and {args.base} of {base.world!r}: "
                             "a paired comparison needs two models of one synthetic world (shapes, motion or solid)")
        if policy.kind != base.kind:
            raise UsageError(f"{name} is a {policy.kind} model and {args.base} a {base.kind} model: "
                             "a paired comparison needs the same sampler for both")
    if args.split not in world.splits:
        raise UsageError(f"unknown split {args.split!r}; valid splits: {', '.join(world.splits)}")
    sampler = _comparison_sampler(base, args)
    prompts = comparison_prompts(args.split, args.n, world=world.name)
    report = compare_models(base, models, prompts, sampler, seed=args.seed,
                            samples_per_prompt=args.samples_per_prompt, reward_name=args.reward,
                            n_boot=args.bootstrap)
    report.settings = {"base": args.base, "models": args.model, "split": args.split, "sampler": sampler.name,
                       "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
                       "reward": args.reward}
    if args.sampler is not None:
        report.settings.update(stochastic_steps=args.stochastic_steps, noise_level=sampler.noise_level,
                               eta=sampler.eta)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
        tmp.replace(out)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report, args.base, args.model))
    return 0


# -- train ----------------------------------------------------------------------------------------
def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    from reference_impls.algorithms import METHODS
    from reference_impls.rewards import REWARDS
    from reference_impls.training.config import SHARED_PRESETS, add_config_arguments

    rewards = "; ".join(f"{n} ({'differentiable' if r.differentiable else 'not differentiable'})"
                        for n, r in REWARDS.items())
    train = subparsers.add_parser(
        "train", help="fine-tune a model with one of the methods",
        description="Fine-tune a model with an RL method. `rlvg train METHOD --help` lists its own flags.",
        epilog=f"methods: {', '.join(METHODS)}. rewards: {rewards}",
    )
    methods = train.add_subparsers(dest="method", metavar="METHOD", required=True,
                                   parser_class=argparse.ArgumentParser)
    for name, cls in METHODS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        method_parser = methods.add_parser(
            name, help=doc[0] if doc else name, description="\n".join(doc),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"rewards: {rewards}\npresets: " + "; ".join(
                f"{p}: {', '.join(f'{k}={v}' for k, v in {**SHARED_PRESETS.get(p, {}), **s}.items())}"
                for p, s in cls.presets.items()),
        )
        add_config_arguments(method_parser, cls.config_class)
        method_parser.add_argument("--out", default=None, help="run directory (default: runs/METHOD-PRESET-seedS)")
        method_parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        method_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        method_parser.add_argument(
            "--num-processes", type=int, default=1,
            help="data-parallel processes, launched through accelerate (gloo on CPU, one GPU each with "
                 "--device cuda); the batch and minibatch must split evenly (default 1)")
        method_parser.set_defaults(handler=_cmd_train)


def _launch_processes(args: argparse.Namespace) -> int:
    """Run this same ``rlvg train`` command in ``--num-processes`` processes through ``accelerate launch``."""
    import socket
    import subprocess

    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            argv.append(item)
    with socket.socket() as probe:  # a free port, so that runs side by side do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # accelerate's --multi_gpu is its torchrun launcher; on a machine without GPUs the processes
    # then form a gloo group (Accelerator(cpu=True)).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "reference_impls.cli", *argv]
    return subprocess.call(command)


def _cmd_train(args: argparse.Namespace) -> int:
    from reference_impls.algorithms import get_method
    from reference_impls.rewards import UnknownRewardError, get_reward
    from reference_impls.training import NonFiniteLossError, build_config, train
    from reference_impls.training.config import field_docs
    from reference_impls.training.distributed import launched_by_accelerate, setup_distributed

    cls = get_method(args.method)
    overrides = {name: getattr(args, name) for name in field_docs(cls.config_class) if hasattr(args, name)}
    try:
        config = build_config(cls.config_class, cls.presets, overrides, cls.video_presets)
        reward = get_reward(config.reward, config.reward_model or None)
    except (ValueError, UnknownRewardError) as error:
        raise UsageError(str(error)) from None
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 and not launched_by_accelerate():
        if not cls.supports_distributed:
            from reference_impls.algorithms import METHODS

            able = [name for name, c in METHODS.items() if c.supports_distributed]
            raise UsageError(f"{cls.name} runs in one process only; methods that run over several processes: "
                             f"{', '.join(able)}")
        return _launch_processes(args)
    distributed = setup_distributed(cpu=config.device == "cpu")
    _set_threads(config.threads)
    device = config.device if not distributed.enabled or config.device == "cpu" else str(distributed.accelerator.device)
    policy = _load(config.model, device)
    try:
        method = cls(policy=policy, reward=reward, config=config)
    except ValueError as error:
        raise UsageError(str(error)) from None
    method.distributed = distributed
    out = Path(args.out or f"runs/{cls.name}-{config.preset}-seed{config.seed}")
    try:
        records = train(method, out, resume=args.resume, progress=not args.no_progress)
    except (FileExistsError, ValueError) as error:
        raise UsageError(str(error)) from None
    except NonFiniteLossError as error:
        print(f"rlvg train: {error}", file=sys.stderr)
        return 1
    if not distributed.is_main:
        return 0
    first = next((r for r in records if "eval_accuracy" in r), {})
    last = next((r for r in reversed(records) if "eval_accuracy" in r), {})
    summary = {"out": str(out), "steps": records[-1]["step"] if records else 0,
               "reward_mean_first": next((r["reward_mean"] for r in records if "reward_mean" in r), None),
               "reward_mean_last": next((r["reward_mean"] for r in reversed(records) if "reward_mean" in r), None),
               "eval_accuracy_before": first.get("eval_accuracy"), "eval_accuracy_after": last.get("eval_accuracy"),
               "wall_s": records[-1]["wall_s"] if records else 0}
    verdict_path = out / "final" / "verdict.json"
    if verdict_path.exists():  # a per-prompt 3D method: its field's verdict and files instead of held-out accuracy
        verdict = json.loads(verdict_path.read_text(encoding="utf-8"))
        summary = {"out": str(out), "steps": summary["steps"], "prompt": verdict["prompt"],
                   "score_before": records[0].get("eval_score") if records else None,
                   "score_after": verdict["score"], "correct": verdict["correct"],
                   "files": sorted(str(p) for p in (out / "final").iterdir()), "wall_s": summary["wall_s"]}
    print(json.dumps(summary, indent=2))
    return 0


# -- bench ----------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    names = {"rollout": "benchmarks.rollout_overhead", "update": "benchmarks.update_overhead",
             "methods": "benchmarks.method_table"}
    if args.which not in names:
        raise UsageError(f"unknown benchmark {args.which!r}; valid: {', '.join(names)}")
    try:
        module = importlib.import_module(names[args.which])
    except ImportError as error:
        raise UsageError(f"benchmarks live in the repository checkout (benchmarks/): {error}") from None
    return int(module.main(["--quick"] if args.quick else []) or 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    from reference_impls.models.loading import SHIPPED_MODELS

    models = ", ".join(SHIPPED_MODELS)
    p = subparsers.add_parser("pretrain", help="pretrain a tiny base model on a synthetic world (deterministic)")
    p.add_argument("--world", default="shapes",
                   help="synthetic world: shapes (images), motion (clips) or solid (4 views); a motion or solid "
                        "model starts from --inflate-from")
    p.add_argument("--frames", type=int, default=8, help="motion world: frames per clip")
    p.add_argument("--inflate-from", default=None,
                   help="motion and solid worlds: the ShapeWorld model of the same kind to inflate (default: "
                        "shapes-flow-clip or shapes-diffusion, what the shipped models were made from)")
    p.add_argument("--model", choices=["diffusion", "flow"], required=True, help="model kind")
    p.add_argument("--steps", type=int, default=1800, help="optimiser steps (the run is deterministic in them)")
    p.add_argument("--minutes", type=float, default=None, help="optional wall-clock cap")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (replays a run a --minutes cap ended)")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--init-from", default=None,
                   help="continue from this checkpoint folder (e.g. reference_impls/checkpoints/shapes-flow)")
    p.add_argument("--prompts", default="train",
                   help="data mix: a prompt split or several joined by commas, each drawn with equal probability "
                        "(train,train-position doubles down on spatial relations)")
    p.add_argument("--time-shift", type=float, default=1.0,
                   help="flow models: SD3-style shift of the noise-level draw (>1 trains more on high noise)")
    p.add_argument("--coordinate-channels", action="store_true",
                   help="give the UNet x/y coordinate input channels (a new architecture: with --init-from only "
                        "together with --text-encoder-from, which starts them at zero)")
    p.add_argument("--text-encoder-from", default=None,
                   help="condition on this frozen, separately pretrained t5 encoder (python -m "
                        "reference_impls.models.text_pretrain --out DIR) and train the UNet only")
    p.add_argument("--save-every", type=int, default=None,
                   help="write the weight average to --out every N steps (atomically)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--eval-n", type=int, default=256,
                   help="held-out prompts scored into provenance.json (0: skip the evaluation)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    p.set_defaults(handler=_cmd_pretrain)

    p = subparsers.add_parser("sample", help="sample a grid of images (or a GIF of clips) for one prompt")
    p.add_argument("--model", required=True, help=f"shipped name ({models}) or local folder")
    p.add_argument("--prompt", required=True,
                   help="prompt (the ShapeWorld, MotionWorld or SolidWorld grammar for the tiny models, any text otherwise)")
    p.add_argument("--n", type=int, default=16, help="number of images (clips for a video model)")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "sde", "ode"], default=None,
                   help="ddim/ddpm for diffusion models, sde/ode for flow models (default: ddim or ode)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="output: a PNG grid for an image model; an animated GIF for a video model (with a "
                        "frame-strip PNG of the same name beside it)")
    p.set_defaults(handler=_cmd_sample)

    p = subparsers.add_parser("eval", help="compositional accuracy on held-out prompts (exact evaluator)")
    p.add_argument("--model", required=True, help=f"shipped name ({models}) or local folder")
    p.add_argument("--n", type=int, default=256, help="number of prompts")
    p.add_argument("--split", default="heldout", help="prompt split: heldout, train, easy, all")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "sde", "ode"], default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_eval)

    p = subparsers.add_parser(
        "compare", help="paired comparison of fine-tuned model(s) with their base, with 95%% bootstrap CIs",
        description="Both models draw images for the same prompts from the same initial noise with the same "
                    "deterministic sampler; differences are averaged per prompt and bootstrapped over prompts "
                    "(and over models, when several seeds are given), stratified by task.")
    p.add_argument("--base", required=True, help=f"the model fine-tuning started from ({models} or a folder)")
    p.add_argument("--model", required=True, nargs="+",
                   help="fine-tuned model folder(s), e.g. runs/x/final; several = seeds of one method")
    p.add_argument("--split", default="heldout", help="prompt split: heldout (default), train, easy, all")
    p.add_argument("--n", type=int, default=None, help="prompts (default: the whole split, each once)")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="draws per prompt, each with its own noise")
    p.add_argument("--reward", default=None, help="also compare this reward (e.g. the one trained on)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the sampler")
    p.add_argument("--sampler", default=None,
                   help="default: the deterministic one (ode for flow, ddim eta=0 for diffusion models); a "
                        "stochastic one (sde or cps; ddpm or ddim with --eta) judges both models on a training "
                        "sampler, still paired: both draw the same noise at every step")
    p.add_argument("--stochastic-steps", type=int, default=0,
                   help="with a stochastic sampler: only the first N steps sample, the rest are deterministic "
                        "(Flow-GRPO's --sde-steps; 0 = every step)")
    p.add_argument("--noise-level", type=float, default=0.7, help="flow sde/cps: the noise level a (or eta for cps)")
    p.add_argument("--eta", type=float, default=None, help="diffusion ddim: eta (default 0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the initial noise and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", default=None, help="also write the JSON report to this file (atomically)")
    p.set_defaults(handler=_cmd_compare)

    _train_parser(subparsers)

    p = subparsers.add_parser("bench", help="run a benchmark from benchmarks/ (ratios measured in one run)")
    p.add_argument("which", help="rollout, update or methods")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(handler=_cmd_bench)
