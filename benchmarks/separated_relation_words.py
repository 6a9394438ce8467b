"""Force the direction words apart in a checkpoint's text encoder, to test whether that teaches relations.

``shapes-flow-clip``'s jointly trained text encoder barely separates "left" from "right" (and "above" from
"below"): see ``benchmarks/relation_given_objects.py``. This script adds a random vector of norm
``--norm`` to the token embedding of the first word of each pair and subtracts it from the second, then
writes the result as a checkpoint folder to continue pretraining from::

    python -m benchmarks.separated_relation_words --out runs/flow-sep-init
    rlvg pretrain --model flow --init-from runs/flow-sep-init --prompts train,train-position \\
        --learning-rate 3e-4 --steps 2400 --save-every 300 --seed 5 --threads 1 --out runs/flow-sep

It prints the text encoder's separation before and after. The ShapeWorld page reports what the
continuation did: relation accuracy stayed at chance, and training pulled the words back together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.relation_given_objects import text_separation
from reference_impls.models import load_policy
from reference_impls.models.components import TinyModelConfig
from reference_impls.models.loading import resolve_model_dir
from reference_impls.models.pretrain import write_checkpoint_atomically
from reference_impls.models.shapes_model import MODEL_FILE

PAIRS = (("left", "right"), ("above", "below"))


def separate(model: str, out: Path, norm: float, seed: int) -> dict:
    folder = resolve_model_dir(model)
    policy = load_policy(model)
    tokenizer = policy.text_encoder.tokenizer
    embeddings = policy.text_encoder.text_encoder.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for first, second in PAIRS:
            direction = torch.randn(embeddings.shape[1], generator=generator)
            direction *= norm / direction.norm()
            embeddings[tokenizer.encode(first)[1]] += direction
            embeddings[tokenizer.encode(second)[1]] -= direction
    saved = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))["config"]
    config = TinyModelConfig(**{**saved, "block_out_channels": tuple(saved["block_out_channels"])})
    provenance = {"command": f"python -m benchmarks.separated_relation_words --model {model} --norm {norm} "
                             f"--seed {seed}", "made_from": str(folder), "pairs": PAIRS, "norm": norm}
    write_checkpoint_atomically(policy, out, config, provenance)
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-flow-clip")
    parser.add_argument("--norm", type=float, default=1.0, help="length of the vector added and subtracted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("before:", text_separation(args.model))
    separate(args.model, Path(args.out), args.norm, args.seed)
    print("after: ", text_separation(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
