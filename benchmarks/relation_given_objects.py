"""Does the base model know spatial relations? Relation accuracy among images that drew both objects.

Position prompts ("a red circle left of a blue square") are 93 of the 156 held-out prompts, so held-out
accuracy moves with them. A model that draws both requested objects but places them at random satisfies
the relation about half the time; this benchmark measures that conditional rate, per relation, for a
model and guidance scale (deterministic ODE/DDIM sampler, 20 steps, two draws per prompt):

    python -m benchmarks.relation_given_objects [--model shapes-flow] [--guidance-scale 1 3]

It also measures what the text encoder hands the UNet: for every held-out position prompt, the distance
between its hidden states and those of the same prompt with one word swapped (left <-> right,
above <-> below; or the first object's colour), at the swapped word and averaged over the words after it.
A word the encoder barely separates cannot steer the image, however the UNet is trained.

Writes the model's entry of ``benchmarks/results/relation_given_objects.json`` (one entry per model).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_description
from reference_impls.evaluation import default_eval_sampler, generate, heldout_prompts
from reference_impls.models import load_policy
from reference_impls.worlds import evaluate_batch, prompt_split
from reference_impls.worlds.evaluate import as_spec

DRAWS = 2


def relation_rates(model: str, guidance_scale: float, split: str = "heldout", seed: int = 7) -> dict:
    """Share of position-prompt images with both objects drawn, and how often the relation then holds."""
    policy = load_policy(model)
    # Every position prompt of the split once (heldout_prompts cycles, so ask for exactly the split's size).
    prompts = [p for p in heldout_prompts(len(prompt_split(split)), split) if as_spec(p).relation is not None]
    repeated = [p for p in prompts for _ in range(DRAWS)]
    images = generate(policy, repeated, default_eval_sampler(policy, guidance_scale=guidance_scale), seed=seed)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    by_relation: dict[str, list[bool]] = {}
    both = 0
    for prompt, verdict in zip(repeated, evaluate_batch(pixels, repeated)):
        spec = as_spec(prompt)
        name, a, b = spec.relation
        present = [any((o.colour, o.shape) == spec.objects[i].key for o in verdict.objects) for i in (a, b)]
        if all(present):
            both += 1
            by_relation.setdefault(name, []).append(verdict.criteria["relation"])
    holds = [h for values in by_relation.values() for h in values]
    return {
        "model": model, "guidance_scale": guidance_scale, "split": split, "prompts": len(prompts), "draws": DRAWS,
        "both_objects_drawn": both / len(repeated),
        "relation_given_both": float(np.mean(holds)) if holds else None,
        "per_relation": {k: {"n": len(v), "rate": float(np.mean(v))} for k, v in sorted(by_relation.items())},
    }


SWAPS = {"relation": {"left": "right", "right": "left", "above": "below", "below": "above"},
         "colour": {"red": "green", "green": "red", "blue": "yellow", "yellow": "blue"}}


@torch.no_grad()
def text_separation(model: str, split: str = "heldout") -> dict:
    """Mean hidden-state distance between a position prompt and its one-word swap, at and after the word."""
    policy = load_policy(model)
    prompts = [p for p in prompt_split(split) if as_spec(p).relation is not None]
    out: dict[str, dict[str, float]] = {}
    for kind, swap in SWAPS.items():
        at_word, after_word = [], []
        for prompt in prompts:
            words = prompt.split()
            index = next(i for i, w in enumerate(words) if w in swap)
            other = " ".join(swap[w] if i == index else w for i, w in enumerate(words))
            hidden = policy.encode_text([prompt, other]).hidden_states
            distance = (hidden[0] - hidden[1]).norm(dim=-1)
            token = index + 1  # after the BOS token; the tokenizer is word-level
            at_word.append(float(distance[token]))
            after_word.append(float(distance[token + 1:len(words) + 1].mean()))
        out[kind] = {"at_word": float(np.mean(at_word)), "after_word": float(np.mean(after_word))}
    norms = policy.encode_text(prompts[:32]).hidden_states.norm(dim=-1)
    out["hidden_state_norm"] = float(norms.mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-flow")
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[1.0, 3.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [relation_rates(args.model, g) for g in args.guidance_scale]
    for row in rows:
        print(f"{row['model']} guidance {row['guidance_scale']}: both objects drawn {row['both_objects_drawn']:.3f}, "
              f"relation holds given both {row['relation_given_both']:.3f} "
              + " ".join(f"{k} {v['rate']:.2f} (n={v['n']})" for k, v in row["per_relation"].items()))
    separation = text_separation(args.model)
    print(f"text encoder of {args.model}: hidden-state norm {separation['hidden_state_norm']:.2f}; one-word swap moves it "
          + ", ".join(f"{k} {v['at_word']:.2f} at the word / {v['after_word']:.2f} after it"
                      for k, v in separation.items() if isinstance(v, dict)))
    # one entry per model, so the relation-blind first base and its successor sit side by side
    out = RESULTS_DIR / "relation_given_objects.json"
    existing = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    models = existing.get("models", {})
    models[args.model] = {"machine": machine_description(), "rows": rows, "text_separation": separation}
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps({"models": models}, indent=2) + "\n", encoding="utf-8")
    partial.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
