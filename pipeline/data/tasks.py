"""Task families, their canonical keys, the eval partition, corruptions and the checker.

Every problem is named by a canonical key that fully determines its answer:
`add:23+45`, `sub:52-17`, `reverse:tavo`, `sort:tavo`, `count:a:banana`,
`fact:zorbin:color`. Prompts are phrased from a few templates per family, so one key
can appear with different wordings; the key, not the wording, is the unit of leakage.

No-leakage rule: a key is in the eval partition iff the first 32 bits of its sha256,
read as a fraction of 2**32, fall below `eval_fraction` (`problem_key_in_eval`). That
test ignores the sampling seed, so under any seed the training splits (pretraining prose,
SFT, preference, RL prompts) draw only keys outside the partition (rejection sampling),
and eval splits draw only keys inside it. Facts are the one deliberate asymmetry: the
statements about every entity are in pretraining, but the question keys
`fact:<entity>:<attribute>` of eval-partition pairs are never asked in SFT/preference/RL,
so evaluation measures whether the model answers questions about facts it only read.

Design choices: pure stdlib (no torch); all randomness comes from a caller-supplied
`random.Random`; answers are parsed back out of keys (`answer_for_key`), so corruptions and
tests need only the key; the checker is strict exact match on the first line.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

from pipeline.config.data import CORRUPTIONS
from pipeline.data.world import ATTRIBUTES, World, fact_statement

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    """One phrased problem: `prompt` is the user turn, `answer` the exact expected reply."""

    family: str
    key: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSpace:
    """What the samplers may draw: operand digits, word lengths and the fact world."""

    digits: int
    word_min: int
    word_max: int
    world: World


@lru_cache(maxsize=1 << 18)
def _key_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def problem_key_in_eval(key: str, eval_fraction: float) -> bool:
    """True iff `key` belongs to the held-out eval partition (seed-independent hash test)."""
    return _key_fraction(key) < eval_fraction


def extract_answer(response: str) -> str:
    """The first non-empty line of a response, stripped (the part the checker grades)."""
    lines = response.strip().splitlines()
    return lines[0].strip() if lines else ""


ANSWER_MARKER = "Answer:"


def final_answer(response: str) -> str:
    """The answer a worked (chain-of-thought) response commits to: the rest of the line after its last
    `Answer:`, without a closing period; a response without the marker is graded on its first line."""
    head, marker, tail = response.rpartition(ANSWER_MARKER)
    if not marker:
        return extract_answer(response)
    lines = tail.strip().splitlines()
    return lines[0].strip().removesuffix(".").strip() if lines else ""


def check(answer: str, response: str) -> bool:
    """Exact match of the stripped response, or of its first line, with the answer."""
    expected = answer.strip()
    return response.strip() == expected or extract_answer(response) == expected


# ---------------------------------------------------------------- keys and answers


def parse_key(key: str) -> tuple[str, tuple[str, ...]]:
    """Split a key into its family and arguments, e.g. `add:23+45` -> ("add", ("23", "45"))."""
    family, _, rest = key.partition(":")
    if family == "add":
        a, _, b = rest.partition("+")
        return family, (a, b)
    if family == "sub":
        a, _, b = rest.partition("-")
        return family, (a, b)
    if family in ("reverse", "sort"):
        return family, (rest,)
    if family in ("count", "fact"):
        first, _, second = rest.partition(":")
        return family, (first, second)
    raise ValueError(f"unknown problem key {key!r}")


def answer_for_key(key: str, world: World) -> str:
    """The correct answer, derived from the key alone (plus the world for facts)."""
    family, args = parse_key(key)
    if family == "add":
        return str(int(args[0]) + int(args[1]))
    if family == "sub":
        return str(int(args[0]) - int(args[1]))
    if family == "reverse":
        return args[0][::-1]
    if family == "sort":
        return "".join(sorted(args[0]))
    if family == "count":
        return str(args[1].count(args[0]))
    return world.entity(args[0]).attribute(args[1])


# ---------------------------------------------------------------- sampling


def random_word(rng: random.Random, min_len: int, max_len: int) -> str:
    """A pronounceable pseudo-word: alternating consonants and vowels."""
    n = rng.randint(min_len, max_len)
    pools = (_CONSONANTS, _VOWELS) if rng.random() < 0.7 else (_VOWELS, _CONSONANTS)
    return "".join(rng.choice(pools[i % 2]) for i in range(n))


def _operand(rng: random.Random, digits: int, exact: bool) -> int:
    # Draw the digit count first (weight n for n digits) so short operands stay common
    # without dominating: with digits=2, one operand in three has a single digit.
    n = digits if exact else rng.choices(range(1, digits + 1), weights=range(1, digits + 1))[0]
    return rng.randint(0 if n == 1 and not exact else 10 ** (n - 1), 10**n - 1)


def sample_key(family: str, space: TaskSpace, rng: random.Random, exact_digits: int | None = None) -> str:
    """A random key from the family's whole space, ignoring the partition.

    `exact_digits` forces both arithmetic operands to exactly that many digits.
    """
    if family in ("add", "sub"):
        digits = exact_digits or space.digits
        a = _operand(rng, digits, exact_digits is not None)
        b = _operand(rng, digits, exact_digits is not None)
        if family == "add":
            return f"add:{a}+{b}"
        a, b = max(a, b), min(a, b)
        return f"sub:{a}-{b}"
    if family in ("reverse", "sort"):
        return f"{family}:{random_word(rng, space.word_min, space.word_max)}"
    if family == "count":
        word = random_word(rng, space.word_min, space.word_max)
        absent = [c for c in _ALPHABET if c not in word]
        letter = rng.choice(sorted(set(word))) if rng.random() < 0.8 else rng.choice(absent)
        return f"count:{letter}:{word}"
    if family == "fact":
        entity = rng.choice(space.world.entities)
        return f"fact:{entity.key}:{rng.choice(ATTRIBUTES)}"
    raise ValueError(f"unknown family {family!r}")


def draw_key(
    family: str,
    space: TaskSpace,
    rng: random.Random,
    eval_fraction: float,
    in_eval: bool,
    exact_digits: int | None = None,
    max_attempts: int = 10_000,
) -> str | None:
    """Rejection-sample a key on the requested side of the partition; None if none found."""
    for _ in range(max_attempts):
        key = sample_key(family, space, rng, exact_digits)
        if problem_key_in_eval(key, eval_fraction) == in_eval:
            return key
    return None


# ---------------------------------------------------------------- phrasing

_PROMPTS: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "{a} - {b} = ?"),
    "reverse": ("Reverse the word {w}.", "What is {w} spelled backwards?", "Write {w} backwards."),
    "sort": ("Sort the letters of {w}.", "Put the letters of {w} in alphabetical order.",
             "What are the letters of {w} in sorted order?"),
    "count": ("How many {c}'s are in {w}?", "Count the letter {c} in {w}.", "How many times does {c} appear in {w}?"),
}
_FACT_PROMPTS: dict[str, tuple[str, ...]] = {
    "species": ("What kind of animal is {n}?", "What animal is {n}?", "Which animal is {n}?"),
    "color": ("What color is {n}?", "What is the color of {n}?", "Which color is {n}?"),
    "home": ("Where does {n} live?", "Where is the home of {n}?", "In which place does {n} live?"),
    "food": ("What does {n} like to eat?", "What is the favourite food of {n}?", "Which food does {n} love?"),
    "friend": ("Who is the best friend of {n}?", "Who is {n}'s best friend?",
               "Which animal is the best friend of {n}?"),
}

_PROSE: dict[str, tuple[str, ...]] = {
    "add": ("{a} plus {b} equals {r}.", "{a} plus {b} is {r}.", "The sum of {a} and {b} is {r}.",
            "Adding {a} and {b} gives {r}.", "{a} + {b} = {r}."),
    "sub": ("{a} minus {b} equals {r}.", "{a} minus {b} is {r}.", "If you take {b} from {a} you get {r}.",
            "The difference between {a} and {b} is {r}.", "{a} - {b} = {r}."),
    "reverse": ("The word {w} reversed is {r}.", "Spelled backwards, {w} is {r}.",
                "If you reverse {w} you get {r}.", "{w} backwards is {r}."),
    "sort": ("The letters of {w} in sorted order are {r}.", "Sorting the letters of {w} gives {r}.",
             "In alphabetical order, the letters of {w} are {r}."),
    "count": ("There are {r} {c}'s in {w}.", "The word {w} has {r} {c}'s.", "The letter {c} appears {r} times in {w}."),
}
_WORD_PROBLEMS = {
    "add": "{n} had {a} {food} and got {b} more, so now {n} has {r}.",
    "sub": "{n} had {a} {food} and gave away {b}, so {r} were left.",
}


def _fields(key: str) -> dict[str, str]:
    family, args = parse_key(key)
    if family in ("add", "sub"):
        return {"a": args[0], "b": args[1]}
    if family in ("reverse", "sort"):
        return {"w": args[0]}
    if family == "count":
        return {"c": args[0], "w": args[1]}
    return {"attr": args[1], "entity": args[0]}


def make_problem(key: str, world: World, rng: random.Random) -> Problem:
    """Phrase `key` as a question with a randomly chosen template."""
    family, _ = parse_key(key)
    fields = _fields(key)
    if family == "fact":
        template = rng.choice(_FACT_PROMPTS[fields["attr"]])
        prompt = template.format(n=world.entity(fields["entity"]).name)
    else:
        prompt = rng.choice(_PROMPTS[family]).format(**fields)
    return Problem(family=family, key=key, prompt=prompt, answer=answer_for_key(key, world))


def prose_sentence(key: str, world: World, rng: random.Random) -> str:
    """State an arithmetic or string problem with its answer as a pretraining sentence."""
    family, _ = parse_key(key)
    if family == "fact":
        raise ValueError("fact keys are stated through world.fact_document, not prose_sentence")
    fields = _fields(key) | {"r": answer_for_key(key, world)}
    if family in _WORD_PROBLEMS and int(fields["a"]) > 1 and int(fields["b"]) > 1 and rng.random() < 0.15:
        entity = rng.choice(world.entities)
        return _WORD_PROBLEMS[family].format(n=entity.name, food=entity.food, **fields)
    return rng.choice(_PROSE[family]).format(**fields)


# ---------------------------------------------------------------- worked solutions (chain of thought)


def _digits(n: str, width: int) -> list[int]:
    """Digits of `n` from the least significant, zero-filled to `width`."""
    return [int(c) for c in reversed(n.zfill(width))]


def _column_addition(a: str, b: str) -> list[str]:
    """One step per column, least significant first; each step restates the partial result so far,
    so the last step ends with the whole sum: `7+8=15, so 5 carry 1. 4+3+1=8, so 85.`"""
    width = max(len(a), len(b))
    steps, partial, carry = [], "", 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        total = x + y + carry
        last = i == width - 1
        partial = (str(total) if last else str(total % 10)) + partial
        terms = f"{x}+{y}" + ("+1" if carry else "")
        carry = total // 10
        steps.append(f"{terms}={total}, so {partial}" + (" carry 1." if carry and not last else "."))
    return steps


def _column_subtraction(a: str, b: str) -> list[str]:
    """One step per column with borrows: `12-7=5, so 5 borrow 1. 5-1-1=3, so 35.` (a >= b)."""
    width = len(a)
    steps, partial, borrow = [], "", 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        needs = x - borrow < y
        top = x + 10 * needs
        value = top - borrow - y
        last = i == width - 1
        partial = str(value) + partial
        if last:
            partial = partial.lstrip("0") or "0"
        steps.append(f"{top}-{y}{'-1' if borrow else ''}={value}, so {partial}" + (" borrow 1." if needs else "."))
        borrow = int(needs)
    return steps


def worked_solution(key: str, world: World) -> str:
    """A step-by-step reply that ends with `Answer: <answer>` (digit-by-digit arithmetic with carries
    and borrows, letter-by-letter string work, the recalled fact)."""
    family, args = parse_key(key)
    answer = answer_for_key(key, world)
    if family == "add":
        steps = _column_addition(*args)
    elif family == "sub":
        steps = _column_subtraction(*args)
    elif family in ("reverse", "sort"):
        letters = list(args[0])
        done = letters[::-1] if family == "reverse" else sorted(letters)
        steps = [f"Letters: {' '.join(letters)}.",
                 f"{'Backwards' if family == 'reverse' else 'Sorted'}: {' '.join(done)}."]
    elif family == "count":
        letter, word = args
        tally, running = 0, []
        for c in word:
            tally += c == letter
            running.append(str(tally))
        steps = [f"Letters: {' '.join(word)}.", f"Count of {letter}: {' '.join(running)}."]
    else:
        steps = [fact_statement(world.entity(args[0]), args[1])]
    return " ".join([*steps, f"{ANSWER_MARKER} {answer}"])


# ---------------------------------------------------------------- corruptions

_FILLER = (
    "The sky was very big that day.", "I also like long walks by the river.", "Birds fly south when it gets cold.",
    "That reminds me of a song.", "Some hills are taller than others.", "Let me think about it some more.",
    "Water is wet and stones are hard.", "My favourite season is spring.", "There are many stars at night.",
    "Maybe we should ask someone else.", "Bread is best when it is warm.", "Clouds can look like animals.",
)


# A wordy lead-in before the answer: right value, wrong form (the reply must be the bare answer).
_PREAMBLES = ("The answer is {x}.", "The answer is {x}, I think.")


def _no_carry_sum(a: int, b: int) -> int:
    """Column-wise sum that forgets every carry (a common slip)."""
    result, place = 0, 1
    while a or b:
        result += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def _no_borrow_difference(a: int, b: int) -> int:
    """Column-wise difference that borrows ten but never decrements the next column."""
    result, place = 0, 1
    while a or b:
        result += ((a % 10 - b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def _swap_two(text: str, rng: random.Random, allow_leading_zero: bool) -> str | None:
    pairs = [
        (i, j) for i in range(len(text)) for j in range(i + 1, len(text))
        if text[i] != text[j] and (allow_leading_zero or i != 0 or text[j] != "0")
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    chars = list(text)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def corrupt(key: str, kind: str, world: World, rng: random.Random) -> str | None:
    """A wrong answer of the given corruption kind, or None where it does not apply.

    `missing_end` returns the correct text (the corruption is the absent end token).
    """
    family, args = parse_key(key)
    correct = answer_for_key(key, world)
    wrong: str | None
    if kind == "missing_end":
        return correct
    if kind == "preamble":
        return rng.choice(_PREAMBLES).format(x=correct)
    if kind == "rambling":
        base = correct
        if rng.random() < 0.5:
            value_kinds = [k for k in CORRUPTIONS[family] if k not in ("preamble", "rambling", "missing_end")]
            base = corrupt(key, rng.choice(value_kinds), world, rng) or correct
        filler = " ".join(rng.sample(_FILLER, rng.randint(2, 3)))
        lead = rng.choice(("{x}. {f}", "{x}, I think. {f}", "{x} and also {g}"))
        return lead.format(x=base, f=filler, g=filler[0].lower() + filler[1:])
    if kind == "off_by_one":
        n = int(correct)
        wrong = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    elif kind == "off_by_ten":
        n = int(correct)
        wrong = str(n + 10 if n < 10 or rng.random() < 0.5 else n - 10)
    elif kind == "carry_error":
        a, b = int(args[0]), int(args[1])
        wrong = str(_no_carry_sum(a, b) if family == "add" else _no_borrow_difference(a, b))
    elif kind == "swapped_digits":
        wrong = _swap_two(correct, rng, allow_leading_zero=False)
    elif kind == "wrong_operator":
        a, b = int(args[0]), int(args[1])
        wrong = str(a - b if family == "add" else a + b)
    elif kind == "swapped_letters":
        wrong = _swap_two(correct, rng, allow_leading_zero=True)
    elif kind == "copied_input":
        wrong = args[0]
    elif kind == "wrong_entity":
        others = {e.attribute(args[1]) for e in world.entities} - {correct}
        wrong = rng.choice(sorted(others)) if others else None
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return None if wrong is None or wrong == correct else wrong


def sample_corruption(key: str, world: World, rng: random.Random) -> tuple[str, str]:
    """Pick a corruption uniformly among those that apply to this problem: (kind, rejected)."""
    family, _ = parse_key(key)
    kinds = list(CORRUPTIONS[family])
    rng.shuffle(kinds)
    for kind in kinds:  # the first applicable kind of a shuffled list is uniform over applicable kinds
        rejected = corrupt(key, kind, world, rng)
        if rejected is not None:
            return kind, rejected
    raise AssertionError(f"no corruption applies to {key!r}")  # missing_end always applies
