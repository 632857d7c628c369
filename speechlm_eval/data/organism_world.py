"""A seeded synthetic world of facts for the model organism, rendered as VoiceBench-style questions.

Entities are named "adjective noun" from real, acoustically distinct words (so a tiny speech encoder can hear them);
each entity has three attributes, each with four one-word values. Facts are split per entity: one attribute is the
held-out evaluation fact (only ever trained on by the text LLM), one is the spoken-QA fact of the speech stage, and the
third is used only by distillation. Questions are multiple choice (``A. x B. y C. z D. w``, answered by a letter,
scored by the official ``mcq`` scorer) or short answer (the value word).

An attribute's options are always its four values in a fixed order, so the letter is a function of the fact. With
random distractors and orders, a 2-layer LM must also learn to copy the letter in front of the recalled value: it
did not within the build's budget (bare letter: chance after 2000 steps; "value letter" replies: 61-97% after
1600-2400 steps, erratic across runs), and the speech path would need that copy from audio too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

from speechlm_eval.data.item import KEY_PHRASE, Item

# Two- or one-syllable words whose espeak-ng pronunciations differ in onset and vowel. Order is the canonical order;
# the seed only permutes which combinations exist and which values they get.
ADJECTIVES: tuple[str, ...] = (
    "brave", "quiet", "lucky", "sleepy", "clever", "angry", "happy", "tiny", "noble", "frozen", "rusty", "gentle",
)  # fmt: skip
NOUNS: tuple[str, ...] = (
    "fox", "owl", "tiger", "rabbit", "dragon", "whale", "spider", "falcon", "turtle", "monkey", "lion", "snake",
)  # fmt: skip


@dataclass(frozen=True)
class Attribute:
    """One attribute: its question template (``{name}`` = the entity) and its eight one-word values."""

    name: str
    template: str
    values: tuple[str, ...]

    def question(self, entity: str) -> str:
        return self.template.format(name=entity)


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("color", "What color is the {name}?", ("red", "blue", "green", "yellow")),
    Attribute("home", "Where does the {name} live?", ("river", "forest", "desert", "castle")),
    Attribute("food", "What does the {name} eat?", ("apples", "honey", "fish", "bread")),
)  # fmt: skip
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
EVAL_SUBSET = "organism_mcq"  # the subset name of the evaluation suite (scored by the ``mcq`` scorer)
# The tuning suite: a third of the distillation-only facts, held out of distillation when hyper-parameters are chosen
# (never the evaluation facts). Like those, they are known to the text LLM and never spoken in the speech stage.
DEV_SUBSET = "organism_dev"
DEV_EVERY = 3
EVAL_SCORER = "mcq"

Split = Literal["eval", "speech", "distill_only"]


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the world. ``n_adjectives * names_per_word`` entities (each word in ``names_per_word`` names)."""

    n_adjectives: int = 12
    n_nouns: int = 12
    names_per_word: int = 12  # 12 = the full 12 x 12 grid, 144 entities

    def __post_init__(self) -> None:
        if not 1 <= self.n_adjectives <= len(ADJECTIVES) or not 1 <= self.n_nouns <= len(NOUNS):
            raise ValueError(f"at most {len(ADJECTIVES)} adjectives and {len(NOUNS)} nouns")
        if not 1 <= self.names_per_word <= min(self.n_adjectives, self.n_nouns):
            raise ValueError("names_per_word must be in [1, min(n_adjectives, n_nouns)]")
        if self.n_adjectives != self.n_nouns:
            raise ValueError("the balanced name grid needs as many adjectives as nouns")


@dataclass(frozen=True)
class Fact:
    """``entity``'s ``attribute`` is ``value``; ``split`` says which stage may train on it."""

    entity: str
    attribute: str
    value: str
    split: Split

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity, self.attribute)

    def question(self) -> str:
        """The short-answer question, e.g. ``"Where does the brave fox live?"``."""
        return ATTRIBUTE_BY_NAME[self.attribute].question(self.entity)


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice rendering of a fact: ``prompt`` holds the question and the options; ``answer`` a letter."""

    fact: Fact
    options: tuple[str, ...]
    answer: str

    @property
    def prompt(self) -> str:
        options = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, self.options))
        return f"{self.fact.question()} {options}"

    @property
    def response(self) -> str:
        """The trained reply: the letter alone (as VoiceBench's mcq rule reads it)."""
        return self.answer


@dataclass(frozen=True)
class World:
    """All entities and facts of one seed, plus the fixed MCQ rendering of each evaluation fact."""

    seed: int
    spec: WorldSpec
    entities: tuple[str, ...]
    facts: tuple[Fact, ...]
    eval_mcqs: tuple[MCQ, ...]

    def split(self, split: Split) -> list[Fact]:
        return [f for f in self.facts if f.split == split]

    @property
    def eval_facts(self) -> list[Fact]:
        return self.split("eval")

    @property
    def speech_facts(self) -> list[Fact]:
        """Spoken-QA facts of the speech stage: one per entity."""
        return self.split("speech")

    @property
    def distill_facts(self) -> list[Fact]:
        """Every non-evaluation fact (the speech-stage fact and the distillation-only fact of each entity)."""
        return [f for f in self.facts if f.split != "eval"]

    @property
    def words(self) -> list[str]:
        """Every content word of the world (entity words and attribute values)."""
        names = sorted({w for e in self.entities for w in e.split()})
        return names + [v for a in ATTRIBUTES for v in a.values]


def entity_names(spec: WorldSpec, rng: random.Random) -> list[str]:
    """``n_adjectives * names_per_word`` distinct "adjective noun" names, each word used exactly ``names_per_word``
    times (a cyclic Latin-square selection of the grid under random permutations)."""
    adjectives = list(ADJECTIVES[: spec.n_adjectives])
    nouns = list(NOUNS[: spec.n_nouns])
    rng.shuffle(adjectives)
    rng.shuffle(nouns)
    shifts = rng.sample(range(spec.n_nouns), spec.names_per_word)
    return sorted(f"{a} {nouns[(i + s) % spec.n_nouns]}" for i, a in enumerate(adjectives) for s in shifts)


def make_world(seed: int = 0, spec: WorldSpec = WorldSpec()) -> World:
    """The world of ``seed``: deterministic (a private ``random.Random(seed)``, no global state).

    Each entity's three attributes are assigned to the splits eval / speech / distill_only by a per-entity rotation,
    so each split holds every attribute equally often. Evaluation values are balanced per attribute (so the gold
    letters are balanced over A-D and the letter prior carries no information); other values are uniform draws.
    """
    rng = random.Random(seed)
    entities = entity_names(spec, rng)
    order = list(range(len(entities)))
    rng.shuffle(order)
    splits: tuple[Split, ...] = ("eval", "speech", "distill_only")
    assignment = {
        (entities[index], attribute.name): splits[(j - rank) % len(ATTRIBUTES)]
        for rank, index in enumerate(order)
        for j, attribute in enumerate(ATTRIBUTES)
    }
    facts: list[Fact] = []
    for attribute in ATTRIBUTES:
        eval_entities = [e for e in entities if assignment[(e, attribute.name)] == "eval"]
        cycle = [attribute.values[i % len(attribute.values)] for i in range(len(eval_entities))]
        rng.shuffle(cycle)
        eval_values = dict(zip(eval_entities, cycle))
        for entity in entities:
            split = assignment[(entity, attribute.name)]
            value = eval_values[entity] if split == "eval" else rng.choice(attribute.values)
            facts.append(Fact(entity, attribute.name, value, split))
    facts.sort(key=lambda f: (f.entity, f.attribute))
    eval_mcqs = tuple(render_mcq(f) for f in facts if f.split == "eval")
    return World(seed=seed, spec=spec, entities=tuple(entities), facts=tuple(facts), eval_mcqs=eval_mcqs)


def render_mcq(fact: Fact) -> MCQ:
    """The multiple-choice rendering of a fact: its attribute's four values, in their fixed order, as options."""
    values = ATTRIBUTE_BY_NAME[fact.attribute].values
    return MCQ(fact=fact, options=values, answer=LETTERS[values.index(fact.value)])


def mcq_renderings(facts: Sequence[Fact], per_fact: int = 1) -> list[MCQ]:
    """``per_fact`` copies of each fact's MCQ (e.g. one per voice it will be spoken in)."""
    return [render_mcq(fact) for fact in facts for _ in range(per_fact)]


def check_disjoint(world: World) -> None:
    """Raise ``ValueError`` if an evaluation fact or its question could leak into a post-text-LLM split.

    Checks that the (entity, attribute) keys of the eval split and of the distillation/speech splits are disjoint, that
    every entity has exactly one eval fact, and that no distillation question text equals an eval question's text.
    """
    eval_keys = {f.key for f in world.eval_facts}
    other_keys = {f.key for f in world.distill_facts}
    if eval_keys & other_keys:
        raise ValueError(f"eval facts also in distillation/speech splits: {sorted(eval_keys & other_keys)[:5]}")
    if len(eval_keys) != len(world.entities) or {e for e, _ in eval_keys} != set(world.entities):
        raise ValueError("every entity must have exactly one eval fact")
    eval_questions = {f.question() for f in world.eval_facts}
    leaked = eval_questions & {f.question() for f in world.distill_facts}
    if leaked:
        raise ValueError(f"eval questions asked in distillation/speech data: {sorted(leaked)[:5]}")
    if {m.fact.key for m in world.eval_mcqs} != eval_keys:
        raise ValueError("eval MCQs do not render exactly the eval facts")


def check_no_eval_leak(world: World, texts: Iterable[str]) -> None:
    """Raise ``ValueError`` when any of ``texts`` (prompts or transcripts of a post-text-LLM stage) asks an eval
    question (its short question is a substring)."""
    eval_questions = [f.question() for f in world.eval_facts]
    for text in texts:
        for question in eval_questions:
            if question in text:
                raise ValueError(f"eval question {question!r} appears in training text {text!r}")


def dev_facts(world: World) -> list[Fact]:
    """Every :data:`DEV_EVERY`-th distillation-only fact of each attribute (in the world's sorted order): the tuning
    split, balanced over attributes. Its facts stand to the speech LLM as the evaluation facts do (typed: learned;
    spoken: never heard), so a repair's effect on them estimates its effect on the evaluation suite without looking
    at it."""
    chosen = {f.key for a in ATTRIBUTES for f in
              [f for f in world.split("distill_only") if f.attribute == a.name][::DEV_EVERY]}
    return [f for f in world.split("distill_only") if f.key in chosen]


def eval_items(world: World, subset: str = EVAL_SUBSET) -> list[Item]:
    """The evaluation suite as :class:`Item` s (text only: the speech arm synthesises the prompt, as for bundled data)."""
    return fact_items(world, world.eval_mcqs, subset)


def dev_items(world: World) -> list[Item]:
    """The tuning suite (:func:`dev_facts`) as :class:`Item` s, subset :data:`DEV_SUBSET`."""
    return fact_items(world, [render_mcq(f) for f in dev_facts(world)], DEV_SUBSET)


def fact_items(world: World, mcqs: Sequence[MCQ], subset: str) -> list[Item]:
    """MCQs as :class:`Item` s of ``subset``, with the fact (and its entity as the key phrase) in ``meta``."""
    return [
        Item(
            id=f"organism/{subset}/{i}",
            subset=subset,
            text=mcq.prompt,
            choices=mcq.options,
            reference=mcq.answer,
            meta={"entity": mcq.fact.entity, "attribute": mcq.fact.attribute, "value": mcq.fact.value,
                  "world_seed": world.seed, KEY_PHRASE: mcq.fact.entity},
        )
        for i, mcq in enumerate(mcqs)
    ]


def mcq_rows(mcqs: Iterable[MCQ]) -> list[dict]:
    """Rows in VoiceBench's columns (``prompt``, ``reference``) plus provenance columns (kept as ``meta``)."""
    return [
        {"prompt": m.prompt, "reference": m.answer, "entity": m.fact.entity, "attribute": m.fact.attribute,
         "value": m.fact.value}
        for m in mcqs
    ]


def distill_rows(mcqs: Iterable[MCQ]) -> list[dict]:
    """Distillation rows in Open-Orca's columns (``id``, ``system_prompt``, ``question``, ``response``), which
    ``speechlm-eval distill --data FILE`` reads, plus provenance columns (entity, attribute, value, split)."""
    return [
        {"id": f"organism/distill/{i}", "system_prompt": "", "question": m.prompt, "response": m.answer,
         "entity": m.fact.entity, "attribute": m.fact.attribute, "value": m.fact.value, "split": m.fact.split}
        for i, m in enumerate(mcqs)
    ]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path
