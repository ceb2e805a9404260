"""The invented world whose facts the model reads in pretraining and is quizzed on later.

Holds `World` (a seeded set of entities, each with a species, color, home place,
favourite food and best friend) and the prose generators that state those facts:
`fact_document` (a profile of one entity in varied templates) and `story_document`
(a short templated story about an entity visiting its friend).

Design choices:
- Names are built from syllables with a private `random.Random`, so the world depends
  only on `world.seed` and `n_entities`, never on the data sampling seed.
- Every sentence any generator writes is true in the world: stories only reuse real
  attributes, so pretraining never teaches a contradiction.
- Foods are plural count nouns so that story templates ("ate them all") stay grammatical.
- The friend relation is a derangement (no entity is its own friend); it need not be
  symmetric, so templates say "best friend" rather than "are friends".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRIBUTES: tuple[str, ...] = ("species", "color", "home", "food", "friend")

SPECIES = ("fox", "owl", "bear", "cat", "frog", "goat", "wolf", "hare", "crow", "mole", "deer", "duck")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown", "silver")
FOODS = ("plums", "apples", "berries", "nuts", "carrots", "pears", "figs", "beans", "cherries", "grapes", "mushrooms",
         "acorns")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "m", "s")


@dataclass(frozen=True)
class Entity:
    """One inhabitant of the world; `key` is the lowercase name used in problem keys."""

    name: str
    species: str
    color: str
    home: str
    food: str
    friend: str

    @property
    def key(self) -> str:
        return self.name.lower()

    def attribute(self, attr: str) -> str:
        """The value of one of `ATTRIBUTES` (e.g. "color" -> "blue")."""
        if attr not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {attr!r}; expected one of {ATTRIBUTES}")
        return str(getattr(self, attr))


@dataclass(frozen=True)
class World:
    """All entities and places; lookups are by lowercase entity key."""

    entities: tuple[Entity, ...]
    places: tuple[str, ...]

    def entity(self, key: str) -> Entity:
        for e in self.entities:
            if e.key == key:
                return e
        raise KeyError(f"no entity {key!r} in the world")

    def by_name(self, name: str) -> Entity:
        return self.entity(name.lower())


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _unique_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = _name(rng, rng.choice((2, 2, 3)))
        if 4 <= len(name) <= 9 and name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_world(n_entities: int, seed: int) -> World:
    """Build the seeded world; needs at least two entities so everyone has a friend."""
    if n_entities < 2:
        raise ValueError(f"world needs at least 2 entities, got {n_entities}")
    rng = random.Random(f"world:{seed}")
    taken: set[str] = set()
    places = _unique_names(rng, max(4, n_entities // 3), taken)
    names = _unique_names(rng, n_entities, taken)
    # A rotation of a shuffled order is a derangement: nobody is their own friend.
    order = list(range(n_entities))
    rng.shuffle(order)
    friend_of = {order[i]: order[(i + 1) % n_entities] for i in range(n_entities)}
    entities = tuple(
        Entity(
            name=names[i],
            species=rng.choice(SPECIES),
            color=rng.choice(COLORS),
            home=rng.choice(places),
            food=rng.choice(FOODS),
            friend=names[friend_of[i]],
        )
        for i in range(n_entities)
    )
    return World(entities=entities, places=tuple(places))


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "species": ("{n} is a {species}.", "{n} is a kind of {species}.", "By birth, {n} is a {species}."),
    "color": ("{n} is {color}.", "The color of {n} is {color}.", "{n} is colored {color}."),
    "home": ("{n} lives in {home}.", "The home of {n} is {home}.", "{n} has always lived in {home}."),
    "food": ("{n} likes to eat {food}.", "The favourite food of {n} is {food}.",
             "{n} loves {food} more than anything."),
    "friend": ("{p} best friend is {friend}.", "The best friend of {n} is {friend}.",
               "{n} spends every day with {friend}, {p} best friend."),
}
# Combined sentences cover several attributes at once, like the prose a reader would see.
_COMBINED_TEMPLATES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("species", "color", "home"), "{n} is a {color} {species} who lives in {home}."),
    (("species", "color"), "{n} is a {color} {species}."),
    (("species", "food"), "{n} is a {species} that likes {food}."),
    (("home", "friend"), "{n} lives in {home} and {p} best friend is {friend}."),
)


def _fields(e: Entity) -> dict[str, str]:
    return {
        "n": e.name, "p": _possessive(e.name), "species": e.species, "color": e.color,
        "home": e.home, "food": e.food, "friend": e.friend,
    }


def fact_sentences(entity: Entity, rng: random.Random) -> list[str]:
    """Sentences that together state all five attributes of `entity`, in random order."""
    fields = _fields(entity)
    remaining = list(ATTRIBUTES)
    sentences: list[str] = []
    if rng.random() < 0.6:
        covered, template = rng.choice(_COMBINED_TEMPLATES)
        sentences.append(template.format(**fields))
        remaining = [a for a in remaining if a not in covered]
    rng.shuffle(remaining)
    sentences.extend(rng.choice(_FACT_TEMPLATES[a]).format(**fields) for a in remaining)
    return sentences


def fact_statement(entity: Entity, attr: str) -> str:
    """One fixed sentence stating `attr` of `entity` (the recall step of a worked fact answer)."""
    return _FACT_TEMPLATES[attr][1].format(**_fields(entity))


def fact_document(world: World, entity: Entity, rng: random.Random) -> str:
    """A profile of `entity` (all attributes), sometimes followed by one fact about its friend."""
    sentences = fact_sentences(entity, rng)
    if rng.random() < 0.5 or sum(map(len, sentences)) < 120:
        friend = world.by_name(entity.friend)
        attr = rng.choice(ATTRIBUTES[:4])
        sentences.append(rng.choice(_FACT_TEMPLATES[attr]).format(**_fields(friend)))
    return " ".join(sentences)


_STORY_OPENERS = (
    "One morning, {n} the {color} {species} left {home} to visit {f}.",
    "Early one day, {n} set out from {home} to see {f}, {p} best friend.",
    "{n} the {species} woke up in {home} and decided to visit {f}.",
)
_STORY_MIDDLES = (
    "{f} lives in {fhome}, so the walk there took a while.",
    "On the way, {n} found some {food} and ate them all.",
    "Everyone knows that {n} loves {food}.",
    "When {n} arrived, {f} the {fspecies} was very happy.",
    "{f} shared some {ffood} with {n}.",
    "The two of them talked and laughed until the sun went down.",
    "It started to rain, so {n} and {f} waited under a big tree.",
    "{f}, who is {fcolor}, showed {n} around {fhome}.",
)
_STORY_CLOSERS = (
    "At night, {n} walked back home to {home}.",
    "Then {n} went home to {home}, tired and glad.",
    "The next day, {n} was back in {home}, thinking of {f}.",
)


def story_document(world: World, entity: Entity, rng: random.Random, max_chars: int = 400) -> str:
    """A short true story: `entity` visits its best friend; 3-6 sentences, about `max_chars` at most."""
    friend = world.by_name(entity.friend)
    fields = _fields(entity) | {
        "f": friend.name, "fhome": friend.home, "fspecies": friend.species,
        "fcolor": friend.color, "ffood": friend.food,
    }
    middles = [m.format(**fields) for m in rng.sample(_STORY_MIDDLES, rng.randint(2, 4))]
    opener, closer = rng.choice(_STORY_OPENERS).format(**fields), rng.choice(_STORY_CLOSERS).format(**fields)
    while len(middles) > 1 and len(" ".join([opener, *middles, closer])) > max_chars:
        middles.pop()
    return " ".join([opener, *middles, closer])
