"""ShapeWorld prompt grammar: parsing, canonical text, enumeration and the train/held-out split.

The language is deliberately small so that a tiny text-conditioned model can learn it on a CPU, yet
compositional enough that faithfulness is not trivial (GenEval's categories: single object, counting,
colour attribution, two objects, position). Three prompt forms exist:

* **single phrase** ``<count> [<size>] <colour> <shape>``: "a red circle", "two blue squares",
  "a small green triangle", "three big yellow circles". Sizes appear only here, which keeps the
  language at a few hundred prompts instead of several thousand.
* **conjunction** ``<phrase> and <phrase>`` with at most 3 objects in total and two different
  colour+shape pairs: "a red circle and two blue squares". Order carries no meaning, so the canonical
  text lists the phrases in palette order (red before green before blue before yellow, then circle,
  square, triangle); "a blue square and a red circle" parses to the same spec as its reverse.
* **relation** ``a <colour> <shape> <relation> a <colour> <shape>`` with relation one of "left of",
  "right of", "above", "below", between two different colour+shape pairs: "a red circle left of a
  blue square". Direction matters, so these keep the order they were written in.

Counts are "a"/"one" (canonically "a"), "two" and "three", with plural nouns after two and three.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import NamedTuple

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[str, int] = {"a": 1, "one": 1, "two": 2, "three": 3}
CANONICAL_COUNT_WORD: dict[int, str] = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 3  # a 32x32 canvas holds three big shapes with gaps between them, not more
SPLITS: tuple[str, ...] = ("train", "heldout", "easy", "all")
TASK_SPLIT_PREFIX = "train-"
"""``train-<task>``: the training prompts of one GenEval-style task (e.g. ``train-position``)."""
HELDOUT_PERCENT = 20
_SPLIT_SALT = "shapeworld-split-v1"  # changing it would reshuffle the held-out set: never do that

_PLURALS: dict[str, str] = {f"{shape}s": shape for shape in SHAPES}

ALLOWED_HELP = (
    "Allowed words: counts a/one/two/three; sizes small/big (single-phrase prompts only); "
    f"colours {'/'.join(COLOURS)}; shapes {'/'.join(SHAPES)} (plural after two/three); "
    "joiners 'and', 'left of', 'right of', 'above', 'below'. "
    "Forms: 'a red circle', 'two blue squares', 'a small green triangle', "
    "'a red circle and two blue squares' (at most 3 objects, different colour+shape pairs), "
    "'a red circle left of a blue square' (relations join two single objects)."
)


class PromptError(ValueError):
    """A prompt outside the ShapeWorld grammar; ``word`` is the offending word (or '<end>')."""

    def __init__(self, problem: str, word: str, text: str) -> None:
        self.word = word
        self.text = text
        super().__init__(f"{problem} (offending word: {word!r}) in prompt {text!r}. {ALLOWED_HELP}")


@dataclass(frozen=True)
class ObjectSpec:
    """One noun phrase: ``count`` objects of one colour and shape, optionally all small or all big."""

    colour: str
    shape: str
    count: int = 1
    size: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; allowed: {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; allowed: {SHAPES}")
        if self.count not in CANONICAL_COUNT_WORD:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; allowed: {SIZES} or None")

    @property
    def text(self) -> str:
        """Canonical noun phrase, e.g. 'a small red circle' or 'two blue squares'."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        words = [CANONICAL_COUNT_WORD[self.count], self.size, self.colour, noun]
        return " ".join(w for w in words if w)

    @property
    def key(self) -> tuple[str, str]:
        """(colour, shape): what identifies the phrase for counting and matching."""
        return (self.colour, self.shape)


class Relation(NamedTuple):
    """Spatial relation ``objects[a] <name> objects[b]``, e.g. ('left of', 0, 1)."""

    name: str
    a: int
    b: int


def _palette_order(obj: ObjectSpec) -> tuple[int, int, int, int]:
    size_rank = -1 if obj.size is None else SIZES.index(obj.size)
    return (COLOURS.index(obj.colour), SHAPES.index(obj.shape), obj.count, size_rank)


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: 1-2 noun phrases (1-3 objects in all) and an optional relation between them.

    Construction validates the same rules as the parser and puts conjunctions in canonical order, so
    two specs are equal exactly when their canonical texts are equal.
    """

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"a prompt has one or two noun phrases, got {len(objects)}")
        if sum(o.count for o in objects) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects in a prompt")
        if len(objects) == 2:
            if objects[0].key == objects[1].key:
                raise ValueError("the two phrases must differ in colour or shape")
            if any(o.size is not None for o in objects):
                raise ValueError("size adjectives are only allowed in single-phrase prompts")
        relation = self.relation
        if relation is not None:
            relation = Relation(*relation)
            if relation.name not in RELATIONS:
                raise ValueError(f"unknown relation {relation.name!r}; allowed: {RELATIONS}")
            if len(objects) != 2 or sorted((relation.a, relation.b)) != [0, 1]:
                raise ValueError("a relation joins objects 0 and 1 of a two-phrase prompt")
            if any(o.count != 1 for o in objects):
                raise ValueError("relations join two single objects (count 1)")
        elif len(objects) == 2:
            objects = tuple(sorted(objects, key=_palette_order))
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "relation", relation)

    @property
    def text(self) -> str:
        """Canonical prompt text (lower case, single spaces, 'a' for one, conjunctions sorted)."""
        if self.relation is not None:
            first, second = self.objects[self.relation.a], self.objects[self.relation.b]
            return f"{first.text} {self.relation.name} {second.text}"
        return " and ".join(o.text for o in self.objects)

    @property
    def n_objects(self) -> int:
        """Total number of object instances the prompt asks for."""
        return sum(o.count for o in self.objects)

    def __str__(self) -> str:
        return self.text


class _Tokens:
    """Cursor over the words of a prompt that raises PromptError with the offending word."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.lower().replace(",", " ").strip().rstrip(".").split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, expected: str) -> str:
        word = self.peek()
        if word is None:
            last = self.words[-1] if self.words else "<empty>"
            raise PromptError(f"prompt ended after {last!r}; expected {expected}", "<end>", self.text)
        self.pos += 1
        return word

    def fail(self, problem: str, word: str) -> PromptError:
        return PromptError(problem, word, self.text)


def _parse_phrase(tokens: _Tokens) -> tuple[ObjectSpec, dict[str, str]]:
    """Parse ``<count> [<size>] <colour> <shape>``; also return the words used, for later errors."""
    count_word = tokens.take("a count (a, one, two, three)")
    if count_word not in COUNT_WORDS:
        raise tokens.fail(f"expected a count (a, one, two, three), got {count_word!r}", count_word)
    count = COUNT_WORDS[count_word]
    word = tokens.take(f"a size or colour ({', '.join(SIZES + COLOURS)})")
    size = None
    size_word = ""
    if word in SIZES:
        size, size_word = word, word
        word = tokens.take(f"a colour ({', '.join(COLOURS)})")
    if word not in COLOURS:
        raise tokens.fail(f"expected a colour ({', '.join(COLOURS)}), got {word!r}", word)
    colour = word
    noun = tokens.take(f"a shape ({', '.join(SHAPES)})")
    if noun in SHAPES:
        if count != 1:
            raise tokens.fail(f"{noun!r} must be plural after {count_word!r}", noun)
        shape = noun
    elif noun in _PLURALS:
        if count == 1:
            raise tokens.fail(f"{noun!r} is plural but the count {count_word!r} is one", noun)
        shape = _PLURALS[noun]
    else:
        raise tokens.fail(f"expected a shape ({', '.join(SHAPES)}), got {noun!r}", noun)
    words = {"count": count_word, "size": size_word, "noun": noun}
    return ObjectSpec(colour=colour, shape=shape, count=count, size=size), words


def _parse_relation_word(tokens: _Tokens) -> str:
    word = tokens.take("a relation")
    if word in ("above", "below"):
        return word
    if word in ("left", "right"):
        of = tokens.take("'of'")
        if of != "of":
            raise tokens.fail(f"expected 'of' after {word!r}, got {of!r}", of)
        return f"{word} of"
    raise tokens.fail(f"expected 'and', 'left of', 'right of', 'above' or 'below', got {word!r}", word)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt (case and whitespace insensitive, trailing '.' allowed) into a PromptSpec.

    Raises PromptError, naming the offending word and listing the grammar, for anything outside it.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    tokens = _Tokens(text)
    if not tokens.words:
        raise PromptError("empty prompt", "<empty>", text)
    first, first_words = _parse_phrase(tokens)
    if tokens.peek() is None:
        return PromptSpec(objects=(first,))
    if tokens.peek() == "and":
        tokens.take("'and'")
        relation_name = None
    else:
        relation_name = _parse_relation_word(tokens)
    second, second_words = _parse_phrase(tokens)
    extra = tokens.peek()
    if extra is not None:
        raise tokens.fail(f"unexpected {extra!r} after a complete prompt (at most two phrases)", extra)
    # The words are all known; now check the rules that span both phrases, blaming a precise word.
    for words in (first_words, second_words):
        if words["size"]:
            raise tokens.fail("size adjectives are only allowed in single-phrase prompts", words["size"])
    if first.key == second.key:
        raise tokens.fail("the two phrases must differ in colour or shape", second_words["noun"])
    if relation_name is not None:
        for obj, words in ((first, first_words), (second, second_words)):
            if obj.count != 1:
                raise tokens.fail("relations join two single objects ('a ...')", words["count"])
        return PromptSpec(objects=(first, second), relation=Relation(relation_name, 0, 1))
    if first.count + second.count > MAX_OBJECTS:
        raise tokens.fail(f"more than {MAX_OBJECTS} objects in one prompt", second_words["count"])
    return PromptSpec(objects=(first, second))


def as_spec(prompt: str | PromptSpec) -> PromptSpec:
    """Accept either a prompt text or an already parsed spec."""
    return prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)


@lru_cache(maxsize=1)
def _all_specs() -> tuple[PromptSpec, ...]:
    pairs = list(itertools.product(COLOURS, SHAPES))
    specs: list[PromptSpec] = []
    for count in (1, 2, 3):
        for size in (None, *SIZES):
            for colour, shape in pairs:
                specs.append(PromptSpec((ObjectSpec(colour, shape, count, size),)))
    for (c1, s1), (c2, s2) in itertools.combinations(pairs, 2):
        for n1, n2 in ((1, 1), (1, 2), (2, 1)):
            specs.append(PromptSpec((ObjectSpec(c1, s1, n1), ObjectSpec(c2, s2, n2))))
    for name in RELATIONS:
        for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2):
            specs.append(PromptSpec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), Relation(name, 0, 1)))
    return tuple(specs)


def all_prompts() -> list[str]:
    """Every canonical prompt of the grammar, in a fixed order (single, conjunction, relation)."""
    return [spec.text for spec in _all_specs()]


def is_heldout(text: str) -> bool:
    """Stable membership of the held-out split: a salted SHA-256 of the canonical text.

    Python's hash() is randomised per process, so it cannot define a split that must never move.
    """
    canonical = parse_prompt(text).text
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


@cache
def _split(name: str) -> tuple[str, ...]:
    prompts = all_prompts()
    if name == "all":
        return tuple(prompts)
    if name == "heldout":
        return tuple(p for p in prompts if is_heldout(p))
    train = tuple(p for p in prompts if not is_heldout(p))
    if name == "train":
        return train
    if name == "easy":
        # One object, drawn from train so the held-out prompts stay unseen by anything that trains.
        return tuple(p for p in train if parse_prompt(p).n_objects == 1)
    if name.startswith(TASK_SPLIT_PREFIX):
        from reference_impls.worlds.evaluate import TASKS, prompt_task  # evaluate imports this module

        task = name[len(TASK_SPLIT_PREFIX):]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in split {name!r}; allowed: "
                             f"{', '.join(TASK_SPLIT_PREFIX + t for t in TASKS)}")
        return tuple(p for p in train if prompt_task(p) == task)
    raise ValueError(f"unknown split {name!r}; allowed: {SPLITS} or {TASK_SPLIT_PREFIX}<task>")


def prompt_split(name: str) -> list[str]:
    """Prompts of a split: 'train', 'heldout' (~20%, never for training), 'easy' (one-object train
    prompts), 'all', or 'train-<task>' (the training prompts of one task, e.g. 'train-position')."""
    return list(_split(name))


def sample_prompts(n: int, split: str = "train", rng: np.random.Generator | None = None) -> list[str]:
    """Draw ``n`` prompts uniformly with replacement from a split (deterministic given ``rng``)."""
    if rng is None:
        rng = np.random.default_rng(0)
    pool = _split(split)
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]
