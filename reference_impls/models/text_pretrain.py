r"""Pretrain a small bidirectional text encoder on its own, to be frozen inside a ShapeWorld base model.

Real text-to-image models condition on an encoder that was trained on text before the image model saw
it (CLIP's or T5's), and they keep it frozen. Our first bases trained a causal CLIP encoder jointly with
the UNet instead, and that encoder learned to pass on colours but hardly directions: swapping "left" for
"right" moved its states 13x less than swapping a colour, and nothing in pretraining or RL pulled the
words apart again (`benchmarks/relation_given_objects.py`, ShapeWorld page).

This module gives the encoder its language first. Every word of a noun phrase is taught to name its own
object, including the side of the scene the relation puts that object on, by a linear read-out per
attribute trained with cross-entropy on the train split's prompts:

$$
\mathcal L = \sum_{i \in \text{phrase words}} \sum_{a \in \{\text{colour, shape, count, size, side}\}}
-\log \mathrm{softmax}(W_a h_i)[y_{a}(i)]
\;+\; \sum_{i \in \text{relation words}} -\log \mathrm{softmax}(W_\text{rel} h_i)[y_\text{rel}]
$$

With "a red circle left of a blue square", the words of the first phrase learn side = left and those of
the second side = right; a bidirectional (T5) encoder is needed for the first phrase, whose words come
before the relation. The read-outs are thrown away; the encoder's states then carry which object goes
where, in a form the UNet's cross-attention can match against pixel positions.

Run: ``python -m reference_impls.models.text_pretrain --out DIR`` (about a minute on one thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reference_impls.models.components import TinyModelConfig, build_text_encoder
from reference_impls.models.tokenizer import WordTokenizer
from reference_impls.worlds.grammar import COLOURS, RELATIONS, SHAPES, SIZES, parse_prompt

SIDES = ("none", "left", "right", "above", "below")
"""Where a phrase's object lies relative to the other one: 'a red circle left of a blue square' puts the
circle left and the square right; phrases of single-object and 'and' prompts have side none."""
RELATION_TARGETS = ("and", *RELATIONS)
"""What a connecting word names."""
OBJECT_HEADS = {"colour": COLOURS, "shape": SHAPES, "count": (1, 2, 3), "size": ("none", *SIZES), "side": SIDES}
OPPOSITE = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("above", "below"),
            "below": ("below", "above")}
IGNORE = -100


@dataclass
class TextPretrainConfig:
    """Settings of the text encoder's pretraining."""

    steps: int = 1500
    """Optimiser steps (AdamW, constant learning rate)."""
    batch_size: int = 64
    """Prompts per step, drawn from the train split."""
    learning_rate: float = 2e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seeds the initialisation and the prompt draw."""


CONNECTORS = {"and": 1, "above": 1, "below": 1, "left": 2, "right": 2}
"""Words that end the first phrase, and how many words the connector spans ('left of')."""


def token_targets(prompt: str, tokenizer: WordTokenizer) -> dict[str, list[int]]:
    """Per token position (BOS, words, EOS, padding): the class index of each read-out, IGNORE elsewhere.

    The phrases are read in the order the prompt gives them (a conjunction need not be canonical)."""
    spec = parse_prompt(prompt)  # validates the whole prompt, with a clear error
    words = tokenizer.split(prompt)
    length = tokenizer.model_max_length
    targets = {name: [IGNORE] * length for name in (*OBJECT_HEADS, "relation")}
    cut = next((i for i, word in enumerate(words) if word in CONNECTORS), len(words))
    spans = [(0, cut, parse_prompt(" ".join(words[:cut])).objects[0])]
    sides = ("none", "none")
    if cut < len(words):
        after = cut + CONNECTORS[words[cut]]
        spans.append((after, len(words), parse_prompt(" ".join(words[after:])).objects[0]))
        connector = "and" if spec.relation is None else spec.relation.name
        if spec.relation is not None:
            sides = OPPOSITE[connector]
        for index in range(cut, after):
            targets["relation"][index + 1] = RELATION_TARGETS.index(connector)
    for (begin, end, phrase), side in zip(spans, sides):
        for index in range(begin, end):
            position = index + 1  # after BOS
            targets["colour"][position] = COLOURS.index(phrase.colour)
            targets["shape"][position] = SHAPES.index(phrase.shape)
            targets["count"][position] = phrase.count - 1
            targets["size"][position] = OBJECT_HEADS["size"].index(phrase.size or "none")
            targets["side"][position] = SIDES.index(side)
    return targets


class ReadOut(torch.nn.Module):
    """One linear classifier per attribute, on every token state."""

    def __init__(self, width: int) -> None:
        super().__init__()
        sizes = {**{name: len(values) for name, values in OBJECT_HEADS.items()}, "relation": len(RELATION_TARGETS)}
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in sizes.items()})

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(states) for name, head in self.heads.items()}


def _batch(prompts: list[str], tokenizer: WordTokenizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tokens = tokenizer(prompts)
    per_prompt = [token_targets(p, tokenizer) for p in prompts]
    targets = {name: torch.tensor([t[name] for t in per_prompt]) for name in per_prompt[0]}
    return tokens, targets


def _loss_and_accuracy(encoder: torch.nn.Module, readout: ReadOut, tokens: dict[str, torch.Tensor],
                       targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    states = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    logits = readout(states)
    loss = torch.zeros(())
    accuracy = {}
    for name, target in targets.items():
        flat_logits, flat_target = logits[name].flatten(0, 1), target.flatten()
        loss = loss + torch.nn.functional.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE)
        mask = flat_target != IGNORE
        accuracy[name] = float((flat_logits[mask].argmax(-1) == flat_target[mask]).float().mean())
    return loss, accuracy


def pretrain_text_encoder(config: TextPretrainConfig, model_config: TinyModelConfig,
                          tokenizer: WordTokenizer) -> tuple[torch.nn.Module, dict]:
    """Train the encoder and its read-outs; returns the encoder (frozen, eval) and a quality report."""
    from reference_impls.worlds import prompt_split

    if model_config.text_encoder != "t5":
        raise ValueError("text pretraining is for the bidirectional t5 encoder; a causal encoder cannot tell a "
                         "first phrase which side it is on")
    torch.manual_seed(config.seed)
    encoder = build_text_encoder(model_config, tokenizer)
    readout = ReadOut(model_config.text_hidden_size)
    parameters = [*encoder.parameters(), *readout.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4)
    train, heldout = prompt_split("train"), prompt_split("heldout")
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    for _ in tqdm(range(config.steps), desc="pretrain text encoder", unit="step"):
        picks = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        tokens, targets = _batch([train[i] for i in picks], tokenizer)
        loss, _ = _loss_and_accuracy(encoder, readout, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        report = {}
        for split, prompts in (("train", train), ("heldout", heldout)):
            tokens, targets = _batch(prompts, tokenizer)
            loss, accuracy = _loss_and_accuracy(encoder, readout, tokens, targets)
            report[split] = {"loss": float(loss), "accuracy": accuracy, "prompts": len(prompts)}
    report["minutes"] = round((time.perf_counter() - start) / 60, 2)
    return encoder, report


def direction_separation(encoder: torch.nn.Module, tokenizer: WordTokenizer, prompts: list[str]) -> dict[str, float]:
    """Mean distance between the states of a relation prompt and the same prompt with its direction swapped
    (left<->right, above<->below), against a colour swap: how strongly the encoder passes on direction."""
    from reference_impls.worlds.grammar import COLOURS as colours

    swap = {"left": "right", "right": "left", "above": "below", "below": "above"}
    pairs = {"direction": [], "colour": []}
    for prompt in prompts:
        words = prompt.split()
        if not any(w in swap for w in words):
            continue
        pairs["direction"].append((prompt, " ".join(swap.get(w, w) for w in words)))
        first_colour = next(w for w in words if w in colours)
        other = colours[(colours.index(first_colour) + 1) % len(colours)]
        pairs["colour"].append((prompt, prompt.replace(first_colour, other, 1)))
    out = {}
    with torch.no_grad():
        for name, pair_list in pairs.items():
            a = tokenizer([p for p, _ in pair_list])
            b = tokenizer([q for _, q in pair_list])
            states_a = encoder(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).last_hidden_state
            states_b = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            mask = a["attention_mask"].bool()
            out[name] = float((states_a - states_b).norm(dim=-1)[mask].mean())
    return out


def save_text_encoder(encoder: torch.nn.Module, tokenizer: WordTokenizer, model_config: TinyModelConfig,
                      out_dir: Path, provenance: dict) -> None:
    """Write ``text_encoder/``, ``tokenizer/``, ``text_config.json`` and ``provenance.json`` atomically."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    encoder.save_pretrained(partial / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(partial / "tokenizer")
    (partial / TEXT_CONFIG).write_text(json.dumps(asdict(model_config), indent=2), encoding="utf-8")
    (partial / "provenance.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


TEXT_CONFIG = "text_config.json"


def main(argv: list[str] | None = None) -> int:
    from reference_impls.models.shapes_model import shapes_vocabulary
    from reference_impls.worlds import prompt_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the encoder to")
    parser.add_argument("--steps", type=int, default=TextPretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_config = TinyModelConfig(text_encoder="t5")
    tokenizer = WordTokenizer(words=shapes_vocabulary(), model_max_length=model_config.max_tokens)
    config = TextPretrainConfig(steps=args.steps, seed=args.seed)
    encoder, report = pretrain_text_encoder(config, model_config, tokenizer)
    report["separation_heldout"] = direction_separation(encoder, tokenizer, prompt_split("heldout"))
    provenance = {"command": "python -m reference_impls.models.text_pretrain " + " ".join(argv or []),
                  "config": asdict(config), "model_config": asdict(model_config), "report": report,
                  "torch": torch.__version__}
    save_text_encoder(encoder, tokenizer, model_config, Path(args.out), provenance)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
