"""Deterministic synthetic corpus for the plugmoe demo backbone and its demo experts.

Three domains with deliberately different vocabulary and style:

* ``general`` – fluent everyday / encyclopedic English prose: daily-life vignettes, animal facts,
  city portraits, fables and weather reports.  Records are ``{"text": ...}``.  This is the
  *base route*: text that should stay on the frozen backbone.
* ``math`` – GSM8K-style arithmetic word problems with short step-by-step solutions.  Records are
  ``{"question": ..., "answer": ...}`` where every step line holds exactly one ``x op y = r``
  (op in ``+ - *``) and the answer ends with ``#### N``.  Numbers stay small (mostly 1-30) so a
  tiny model can learn some of it.
* ``code`` – tiny Python functions and snippets with docstrings and comments.  ``{"text": ...}``.

Files written to ``--out`` (all JSON Lines unless noted):

* ``{domain}_train.jsonl`` and ``{domain}_heldout.jsonl`` for every domain; heldout records never
  occur in the train split.
* ``math_problems.jsonl`` – extra heldout-style problems for self-distillation, disjoint from both
  ``math_train`` and ``math_heldout``.
* ``calibration_general.txt`` – general-domain passages, one per line, drawn from a separate seed
  stream; the base-domain calibration set for routers.

How the backbone mix and the expert sets differ
-----------------------------------------------
The backbone (:mod:`demo.train_backbone`) sees a token mix of roughly 85% ``general_train``, 10%
``math_train`` and 5% ``code_train`` (about 1.3 epochs of each of the two small splits, versus
~7.5 epochs of general text).  That is enough to make it fluent in general English and to teach it
the math/code *formats* (and a little arithmetic, which self-distillation can build on), but it
stays clearly under-trained on math and code.  Code gets the smaller share because its templates
have much lower entropy: at 10% the backbone left too little perplexity for a code expert to win.
Domain experts are trained on 100% of their domain's ``*_train`` split (plus, for math, distilled
answers to ``math_problems``), so they have plenty of room to cut math/code perplexity.  Every
``*_heldout`` file and ``math_problems`` are never seen by the backbone; ``*_heldout`` files are
for evaluation only.

Generation uses ``random.Random`` seeded with strings such as ``"0/math/train"`` (string seeds are
hashed with SHA-512, so output does not depend on ``PYTHONHASHSEED``); a run takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("general", "math", "code")


@dataclass(frozen=True)
class CorpusSizes:
    """Number of records per file; chosen to keep all committed data under ~4 MB."""

    general_train: int = 5200
    math_train: int = 3000
    code_train: int = 3000
    heldout: int = 300
    math_problems: int = 600
    calibration: int = 300


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

# (name, subject pronoun, possessive pronoun)
PEOPLE: tuple[tuple[str, str, str], ...] = (
    ("Mia", "she", "her"),
    ("Tom", "he", "his"),
    ("Lena", "she", "her"),
    ("Omar", "he", "his"),
    ("Sara", "she", "her"),
    ("Ben", "he", "his"),
    ("Nina", "she", "her"),
    ("Leo", "he", "his"),
    ("Ava", "she", "her"),
    ("Sam", "he", "his"),
    ("Zoe", "she", "her"),
    ("Max", "he", "his"),
    ("Ella", "she", "her"),
    ("Noah", "he", "his"),
    ("Ivy", "she", "her"),
    ("Jack", "he", "his"),
    ("Lucy", "she", "her"),
    ("Ravi", "he", "his"),
    ("Hana", "she", "her"),
    ("Carlos", "he", "his"),
    ("Grace", "she", "her"),
    ("Eli", "he", "his"),
    ("Maya", "she", "her"),
    ("Finn", "he", "his"),
    ("Rosa", "she", "her"),
    ("Adam", "he", "his"),
    ("Julia", "she", "her"),
    ("Kai", "he", "his"),
    ("Anna", "she", "her"),
    ("Theo", "he", "his"),
    ("Iris", "she", "her"),
    ("Hugo", "he", "his"),
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _person(rng: random.Random, exclude: str | None = None) -> tuple[str, str, str]:
    while True:
        p = rng.choice(PEOPLE)
        if p[0] != exclude:
            return p


def _unique(
    make: Callable[[random.Random], dict[str, str]],
    rng: random.Random,
    n: int,
    seen: set[str],
    key: str,
) -> list[dict[str, str]]:
    """Draw ``n`` records whose ``key`` field is not in ``seen`` (which is updated in place)."""
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > n * 50:
            raise RuntimeError(f"could not draw {n} unique records; template space too small")
        rec = make(rng)
        if rec[key] in seen:
            continue
        seen.add(rec[key])
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------
# General domain
# --------------------------------------------------------------------------------------------

CITIES = (
    "Lisbon",
    "Oslo",
    "Vienna",
    "Kyoto",
    "Dublin",
    "Porto",
    "Bergen",
    "Krakow",
    "Seville",
    "Lyon",
    "Quebec",
    "Valencia",
    "Bruges",
    "Tallinn",
    "Galway",
    "Salzburg",
    "Bologna",
    "Granada",
    "Turku",
    "Ghent",
    "Nantes",
    "Zurich",
    "Leipzig",
    "Cork",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = (
    "market",
    "library",
    "bakery",
    "park",
    "museum",
    "harbour",
    "train station",
    "garden",
    "post office",
    "bookshop",
    "river bank",
    "old bridge",
    "town square",
    "café",
    "school",
)
WEATHER = {
    "sunny": ("bright and clear", "go for a long walk", "sat outside in the warm light"),
    "rainy": ("grey and full of rain", "stay close to home", "listened to the rain on the roof"),
    "windy": ("wild with strong wind", "fly a kite on the hill", "watched the trees bend"),
    "foggy": ("hidden under thick fog", "take the slow road", "waited for the fog to lift"),
    "snowy": ("white with fresh snow", "build a snowman", "drank hot chocolate by the window"),
    "cloudy": ("soft and cloudy", "visit an old friend", "read a book near the fire"),
}
OBJECTS = (
    "a basket of pears",
    "a heavy bag of books",
    "a small wooden box",
    "a bunch of flowers",
    "a loaf of warm bread",
    "an old map",
    "a bright red umbrella",
    "a jar of honey",
    "a new notebook",
    "a paper kite",
    "a letter from home",
    "a pot of soup",
)
TOPICS = (
    "the coming holidays",
    "a film they had both seen",
    "the new bakery in town",
    "their favourite songs",
    "a trip to the mountains",
    "the garden behind the school",
    "an old photograph",
    "the birds in the park",
    "a book about the sea",
    "the autumn fair",
)
ENDINGS = (
    "went home feeling calm and happy",
    "wrote a long letter to a cousin",
    "cooked a simple dinner and went to bed early",
    "watched the sunset from the balcony",
    "called a friend to share the news",
    "planted seeds in a small pot",
    "painted a picture of the quiet street",
    "played the piano until it grew dark",
)
TIMES_OF_DAY = ("morning", "afternoon", "evening")

# (animal, class, habitat, food, trait, social, winter)
ANIMALS = (
    (
        "fox",
        "small mammal",
        "forests and open fields",
        "mice, berries and insects",
        "sharp hearing and clever hunting",
        "alone or in small families",
        "grow a thick winter coat",
    ),
    (
        "owl",
        "bird of prey",
        "old woods and barns",
        "mice and small birds",
        "silent flight and large eyes",
        "alone",
        "stay in the same quiet tree",
    ),
    (
        "otter",
        "playful mammal",
        "rivers and quiet coasts",
        "fish and crabs",
        "thick fur and love of play",
        "in lively groups",
        "keep fishing under the ice",
    ),
    (
        "hedgehog",
        "small mammal",
        "gardens and hedges",
        "beetles, worms and snails",
        "coat of sharp spines",
        "alone",
        "sleep in a nest of leaves",
    ),
    (
        "badger",
        "strong mammal",
        "woodland and meadows",
        "worms, roots and fruit",
        "striped face and deep tunnels",
        "in family groups",
        "rest deep inside their setts",
    ),
    (
        "swan",
        "large bird",
        "lakes and slow rivers",
        "water plants and grass",
        "long neck and graceful swimming",
        "in pairs for life",
        "gather on open water",
    ),
    (
        "deer",
        "gentle mammal",
        "forests and hills",
        "grass, leaves and bark",
        "long legs and quick escapes",
        "in herds",
        "search for food under the snow",
    ),
    (
        "beaver",
        "busy rodent",
        "streams and ponds",
        "bark and water plants",
        "strong teeth and careful dams",
        "in family lodges",
        "eat branches stored under water",
    ),
    (
        "robin",
        "small songbird",
        "gardens and parks",
        "worms and seeds",
        "bright red chest and cheerful song",
        "alone or in pairs",
        "sing even on cold days",
    ),
    (
        "rabbit",
        "small mammal",
        "meadows and dunes",
        "grass and clover",
        "long ears and fast running",
        "in busy warrens",
        "eat bark and dry grass",
    ),
    (
        "squirrel",
        "quick rodent",
        "parks and forests",
        "nuts, seeds and fruit",
        "bushy tail and great climbing",
        "alone",
        "dig up the nuts they hid",
    ),
    (
        "heron",
        "wading bird",
        "marshes and river banks",
        "fish and frogs",
        "patient fishing and long legs",
        "in quiet colonies",
        "fly to warmer water",
    ),
)
ADJECTIVES = ("curious", "brave", "shy", "kind", "clever", "sleepy", "cheerful", "proud", "gentle")
LANDMARKS = (
    "an old stone well",
    "the edge of a deep forest",
    "a quiet pond",
    "a tall oak tree",
    "a little wooden bridge",
    "the foot of a green hill",
    "a field of sunflowers",
)
HABITS = (
    "gathered food for the winter",
    "sang to the rising sun",
    "swept the path to its home",
    "counted the clouds in the sky",
    "visited the river to drink",
    "told stories to the young ones",
)
PROBLEMS = (
    "a broken nest",
    "a lost path home",
    "a heavy stone in the road",
    "a leaking roof",
    "a cold and hungry night",
    "a river that had flooded",
)
MORALS = (
    "kindness is never wasted",
    "friends are found when help is given",
    "patience brings its own reward",
    "small acts can change a whole day",
    "sharing makes every burden lighter",
    "courage grows when we use it",
)
CITY_SIZES = ("small", "busy", "quiet", "lively", "historic", "charming")
GEOGRAPHY = (
    "the sea",
    "a wide river",
    "the mountains",
    "a large lake",
    "rolling green hills",
    "the border",
)
FAMOUS = (
    "colourful old houses",
    "long sandy beaches",
    "ancient churches",
    "busy fish markets",
    "narrow winding streets",
    "grand public gardens",
    "music festivals",
    "stone bridges",
)
SHOPS = ("bakeries", "book shops", "flower stalls", "tea rooms", "craft shops", "cheese shops")
SEASONS = ("spring", "summer", "autumn", "winter")
HOBBIES = (
    "cycle to work",
    "meet friends in the square",
    "swim in the cold water",
    "walk their dogs",
    "visit the weekly market",
    "sing in local choirs",
    "grow vegetables in small gardens",
)
WEATHER_MORNING = (
    "a light mist will cover the streets",
    "the sun will rise behind thin clouds",
    "a cool breeze will blow from the north",
    "short showers will pass over the hills",
)
WEATHER_AFTERNOON = (
    "the sky will clear and it will feel warm",
    "heavier rain is likely near the coast",
    "the wind will grow stronger",
    "clouds will gather over the mountains",
)
WEATHER_ADVICE = (
    "It is a good day to carry an umbrella",
    "Remember to wear a warm coat",
    "It is a fine day for a walk in the park",
    "Drivers should take care on wet roads",
)


def _general_daily(rng: random.Random) -> str:
    name, pr, pos = _person(rng)
    friend = _person(rng, exclude=name)[0]
    weather = rng.choice(list(WEATHER))
    sky, plan, alt = WEATHER[weather]
    day, city, place = rng.choice(DAYS), rng.choice(CITIES), rng.choice(PLACES)
    parts = [
        rng.choice(
            (
                f"{name} woke up early on {day}.",
                f"On {day} morning, {name} opened the window and looked outside.",
                f"It was a quiet {day} in {city}, and {name} had no plans.",
            )
        ),
        f"The sky over {city} was {sky}, so {pr} decided to {plan}.",
        rng.choice(
            (
                f"On the way to the {place}, {pr} met {friend}, who was carrying {rng.choice(OBJECTS)}.",
                f"At the {place}, {pr} ran into {friend}, who was holding {rng.choice(OBJECTS)}.",
                f"Near the {place}, {name} saw {friend} waving from across the street.",
            )
        ),
        f"They talked about {rng.choice(TOPICS)} for a while.",
    ]
    if rng.random() < 0.6:
        parts.append(f"{_cap(pr)} {alt} and thought about {pos} week.")
    parts.append(f"Later that {rng.choice(TIMES_OF_DAY)}, {name} {rng.choice(ENDINGS)}.")
    return " ".join(parts)


def _general_animal(rng: random.Random) -> str:
    animal, cls, habitat, food, trait, social, winter = rng.choice(ANIMALS)
    parts = [
        f"The {animal} is a {cls} found in {habitat}.",
        rng.choice((f"It feeds mainly on {food}.", f"Its diet is made up of {food}.")),
        f"{_cap(animal)}s are known for their {trait}.",
        f"Most {animal}s live {social}.",
    ]
    if rng.random() < 0.7:
        parts.append(f"In winter, they {winter}.")
    parts.append(
        rng.choice(
            (
                f"Many people enjoy watching them near {rng.choice(CITIES)}.",
                "They play an important part in the life of the countryside.",
                f"Children often read about the {animal} in picture books.",
            )
        )
    )
    return " ".join(parts)


def _general_city(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    season = rng.choice(SEASONS)
    weather = rng.choice(list(WEATHER))
    parts = [
        f"{city} is a {rng.choice(CITY_SIZES)} city near {rng.choice(GEOGRAPHY)}.",
        f"It is famous for its {rng.choice(FAMOUS)}.",
        f"Visitors often walk along the main street and stop at small {rng.choice(SHOPS)}.",
        f"The weather in {season} is usually {weather}, and the evenings are {rng.choice(('long', 'calm', 'cool', 'bright'))}.",  # noqa: E501
        f"Local people like to {rng.choice(HOBBIES)}.",
    ]
    if rng.random() < 0.5:
        parts.append(f"Many travellers say that {city} is best seen in {rng.choice(SEASONS)}.")
    return " ".join(parts)


def _general_fable(rng: random.Random) -> str:
    a1 = rng.choice(ANIMALS)[0]
    a2 = rng.choice([a for a in ANIMALS if a[0] != a1])[0]
    adj1, adj2 = rng.sample(ADJECTIVES, 2)
    return " ".join(
        [
            f"Once upon a time, a {adj1} {a1} lived near {rng.choice(LANDMARKS)}.",
            f"Every morning it {rng.choice(HABITS)}.",
            f"One day, a {adj2} {a2} came by and asked for help with {rng.choice(PROBLEMS)}.",
            rng.choice(
                (
                    f"The {a1} did not hesitate and helped the {a2} until the work was done.",
                    f"At first the {a1} was unsure, but in the end it helped the {a2}.",
                )
            ),
            rng.choice(
                (
                    "From that day on, the two animals were the best of friends.",
                    "After that, they met every evening to share their supper.",
                )
            ),
            f"The lesson of the story is that {rng.choice(MORALS)}.",
        ]
    )


def _general_weather(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    weather = rng.choice(list(WEATHER))
    return " ".join(
        [
            f"Today in {city} the weather will be mostly {weather}.",
            f"In the morning, {rng.choice(WEATHER_MORNING)}.",
            f"By the afternoon, {rng.choice(WEATHER_AFTERNOON)}.",
            f"Tonight will be {rng.choice(('cool', 'mild', 'cold', 'calm'))} with {rng.choice(('clear skies', 'light rain', 'a gentle breeze', 'patches of fog'))}.",  # noqa: E501
            f"{rng.choice(WEATHER_ADVICE)}.",
        ]
    )


_GENERAL_KINDS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_general_daily, 0.3),
    (_general_animal, 0.2),
    (_general_city, 0.17),
    (_general_fable, 0.2),
    (_general_weather, 0.13),
)


def make_general(rng: random.Random) -> dict[str, str]:
    """One general-domain passage (single line, no newlines)."""
    fns, weights = zip(*_GENERAL_KINDS, strict=True)
    return {"text": rng.choices(fns, weights=weights)[0](rng)}


# --------------------------------------------------------------------------------------------
# Math domain
# --------------------------------------------------------------------------------------------

ITEMS = (
    "apples",
    "pencils",
    "marbles",
    "stickers",
    "cookies",
    "books",
    "shells",
    "cards",
    "stamps",
    "oranges",
    "balloons",
    "crayons",
    "coins",
    "eggs",
    "flowers",
    "toy cars",
)
CONTAINERS = ("boxes", "bags", "baskets", "jars", "packs", "crates")
# (singular, plural)
GOODS = (
    ("pen", "pens"),
    ("notebook", "notebooks"),
    ("sandwich", "sandwiches"),
    ("ticket", "tickets"),
    ("cup of tea", "cups of tea"),
    ("toy", "toys"),
    ("ball", "balls"),
    ("plant", "plants"),
    ("muffin", "muffins"),
    ("comic", "comics"),
)
DAY_PAIRS = (("Monday", "Tuesday"), ("Saturday", "Sunday"), ("Wednesday", "Thursday"))


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {r}", r


def _math_chain(rng: random.Random) -> dict[str, str]:
    """Start amount followed by 2-3 gain / loss / doubling events."""
    name, pr, _ = _person(rng)
    other = _person(rng, exclude=name)[0]
    item = rng.choice(ITEMS)
    x = rng.randint(3, 30)
    q = [f"{name} has {x} {item}."]
    steps = [f"{name} starts with {x} {item}."]
    n_ops = rng.choice((2, 2, 3))
    for i in range(n_ops):
        kinds = ["add", "sub"] + (["mul"] if x <= 15 and i > 0 else [])
        kind = rng.choice(kinds)
        if kind == "sub" and x < 2:
            kind = "add"
        lead = "" if i == 0 else rng.choice(("Then ", "After that ", "Later "))
        subj = pr if lead else _cap(pr)
        if kind == "add":
            b = rng.randint(1, 20)
            verb, past = rng.choice((("buys", "buying"), ("finds", "finding"), ("gets", "getting")))
            q.append(f"{lead}{subj} {verb} {b} more.")
            s, x = _step(x, "+", b)
            steps.append(f"After {past} {b} {pr} has {s}.")
        elif kind == "sub":
            b = rng.randint(1, min(x, 20))
            verb, past = rng.choice(
                (
                    (f"gives {b} to {other}", "giving"),
                    (f"loses {b}", "losing"),
                    (f"sells {b}", "selling"),
                )
            )
            q.append(f"{lead}{subj} {verb}.")
            s, x = _step(x, "-", b)
            steps.append(f"After {past} {b} away {pr} has {s}.")
        else:
            b = rng.choice((2, 2, 3))
            word = "doubles" if b == 2 else "triples"
            q.append(f"{lead}{subj} {word} the number of {item}.")
            s, x = _step(x, "*", b)
            steps.append(f"After that {pr} has {s}.")
    q.append(f"How many {item} does {name} have now?")
    steps.append(f"#### {x}")
    return {"question": " ".join(q), "answer": "\n".join(steps)}


def _math_groups(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    g, n = rng.randint(2, 6), rng.randint(2, 10)
    s1, total = _step(g, "*", n)
    c = rng.randint(1, total - 1)
    s2, left = _step(total, "-", c)
    q = f"There are {g} {box} with {n} {item} in each. {name} takes {c} {item} out. How many {item} are left?"
    a = f"There are {s1} {item} in total.\nAfter taking {c} out there are {s2} left.\n#### {left}"
    return {"question": q, "answer": a}


def _math_shop(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    (g1, g1s), (g2, _) = rng.sample(GOODS, 2)
    k, p1, p2 = rng.randint(2, 6), rng.randint(1, 9), rng.randint(1, 15)
    s1, cost1 = _step(k, "*", p1)
    s2, total = _step(cost1, "+", p2)
    q = f"A {g1} costs {p1} dollars and a {g2} costs {p2} dollars. {name} buys {k} {g1s} and one {g2}."
    steps = [f"The {g1s} cost {s1} dollars.", f"Adding the {g2} gives {s2} dollars."]
    if rng.random() < 0.5:
        bill = rng.choice([b for b in (20, 50, 100) if b >= total] or [100])
        if bill >= total:
            s3, change = _step(bill, "-", total)
            q += f" {_cap(pr)} pays with {bill} dollars. How much change does {pr} get?"
            steps.append(f"The change is {s3} dollars.")
            steps.append(f"#### {change}")
            return {"question": q, "answer": "\n".join(steps)}
    q += f" How much does {pr} spend?"
    steps.append(f"#### {total}")
    return {"question": q, "answer": "\n".join(steps)}


def _math_age(rng: random.Random) -> dict[str, str]:
    name = _person(rng)[0]
    other = _person(rng, exclude=name)[0]
    a, b, c = rng.randint(3, 30), rng.randint(1, 15), rng.randint(1, 10)
    if rng.random() < 0.5:
        s1, age = _step(a, "+", b)
        rel, how = "older", "+"
    else:
        b = rng.randint(1, a - 1)
        s1, age = _step(a, "-", b)
        rel, how = "younger", "-"
    del how
    s2, future = _step(age, "+", c)
    q = f"{name} is {a} years old. {other} is {b} years {rel} than {name}. How old will {other} be in {c} years?"
    a_ = f"{other} is {s1} years old.\nIn {c} years {other} will be {s2}.\n#### {future}"
    return {"question": q, "answer": a_}


def _math_pages(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    d1, d2 = rng.choice(DAY_PAIRS)
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    n = a + b + rng.randint(1, 40)
    s1, read = _step(a, "+", b)
    s2, left = _step(n, "-", read)
    q = f"A book has {n} pages. {name} reads {a} pages on {d1} and {b} pages on {d2}. How many pages are left?"
    ans = f"{name} reads {s1} pages.\nThe pages left are {s2}.\n#### {left}"
    return {"question": q, "answer": ans}


_MATH_KINDS: tuple[tuple[Callable[[random.Random], dict[str, str]], float], ...] = (
    (_math_chain, 0.4),
    (_math_groups, 0.15),
    (_math_shop, 0.15),
    (_math_age, 0.15),
    (_math_pages, 0.15),
)


def make_math(rng: random.Random) -> dict[str, str]:
    """One GSM8K-style problem ``{"question", "answer"}``."""
    fns, weights = zip(*_MATH_KINDS, strict=True)
    return rng.choices(fns, weights=weights)[0](rng)


STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
FINAL_RE = re.compile(r"####\s*(-?\d+)")


def check_math_answer(answer: str) -> bool:
    """True when every ``x op y = r`` step is correct and ``#### N`` equals the last result."""
    last: int | None = None
    for line in answer.splitlines():
        m = STEP_RE.search(line)
        if m:
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            if r != (a + b if op == "+" else a - b if op == "-" else a * b):
                return False
            last = r
    final = extract_final_number(answer)
    return final is not None and last is not None and final == last


def extract_final_number(text: str) -> int | None:
    """The integer after the first ``####`` in ``text`` (model output or gold), if any."""
    m = FINAL_RE.search(text)
    return int(m[1]) if m else None


def format_math(rec: dict[str, str], chat: bool = False) -> str:
    """Render a math record as training text (the prompt ends right before the answer)."""
    if chat:
        return f"User: {rec['question']}\nAssistant: {rec['answer']}"
    return f"Question: {rec['question']}\nAnswer: {rec['answer']}"


def math_prompt(question: str) -> str:
    """Prompt used for greedy evaluation and distillation."""
    return f"Question: {question}\nAnswer:"


# --------------------------------------------------------------------------------------------
# Code domain
# --------------------------------------------------------------------------------------------

NOUNS = (
    "items",
    "prices",
    "scores",
    "values",
    "numbers",
    "points",
    "ages",
    "lengths",
    "weights",
    "counts",
    "marks",
    "totals",
    "coins",
    "steps",
    "tasks",
    "sizes",
    "votes",
    "rows",
)
PARAM_PAIRS = (("a", "b"), ("x", "y"), ("first", "second"), ("left", "right"), ("m", "n"))
BINOPS = (
    ("add", "sum", "+"),
    ("subtract", "difference", "-"),
    ("multiply", "product", "*"),
    ("combine", "sum", "+"),
    ("scale", "product", "*"),
)
# (name suffix, docstring words, condition on `item`)
CONDITIONS = (
    ("positive", "greater than zero", "item > 0"),
    ("even", "even", "item % 2 == 0"),
    ("odd", "odd", "item % 2 == 1"),
    ("small", "smaller than ten", "item < 10"),
    ("large", "at least one hundred", "item >= 100"),
    ("negative", "below zero", "item < 0"),
)
STRING_FUNCS = (
    ("greet", "name", "Return a friendly greeting for name.", 'return f"Hello, {name}!"'),
    ("shout", "text", "Return text in upper case with an exclamation mark.", 'return text.upper() + "!"'),
    ("reverse_text", "text", "Return the characters of text in reverse order.", "return text[::-1]"),
    ("first_word", "sentence", "Return the first word of a sentence.", "return sentence.split()[0]"),
    ("word_count", "sentence", "Return the number of words in a sentence.", "return len(sentence.split())"),
    ("is_palindrome", "word", "Check whether word reads the same in both directions.", "return word == word[::-1]"),
    ("clean_name", "name", "Strip spaces and capitalise a name.", "return name.strip().title()"),
    (
        "initials",
        "full_name",
        "Return the initials of a full name.",
        'return "".join(part[0] for part in full_name.split())',
    ),
)


def _code_binop(rng: random.Random) -> str:
    verb, desc, op = rng.choice(BINOPS)
    noun = rng.choice(NOUNS)
    a, b = rng.choice(PARAM_PAIRS)
    body = f'def {verb}_{noun}({a}, {b}):\n    """Return the {desc} of {a} and {b}."""\n    return {a} {op} {b}'
    if rng.random() < 0.5:
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        body += f"\n\n\nprint({verb}_{noun}({x}, {y}))"
    return body


def _code_count(rng: random.Random) -> str:
    suffix, words, cond = rng.choice(CONDITIONS)
    noun = rng.choice(NOUNS)
    lines = [
        f"def count_{suffix}_{noun}({noun}):",
        f'    """Count how many {noun} are {words}."""',
        "    count = 0",
        f"    for item in {noun}:",
        f"        if {cond}:",
        "            count += 1",
        "    return count",
    ]
    return "\n".join(lines)


def _code_filter(rng: random.Random) -> str:
    suffix, words, cond = rng.choice(CONDITIONS)
    noun = rng.choice(NOUNS)
    lines = [
        f"def keep_{suffix}_{noun}({noun}):",
        f'    """Return only the {noun} that are {words}."""',
        f"    # A list comprehension keeps the original order of the {noun}.",
        f"    return [item for item in {noun} if {cond}]",
    ]
    return "\n".join(lines)


def _code_total(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    var = rng.choice(("total", "result", "acc"))
    lines = [
        f"def total_{noun}({noun}):",
        f'    """Return the total of all {noun}."""',
        f"    {var} = 0",
        f"    for value in {noun}:",
        f"        {var} += value",
        f"    return {var}",
    ]
    return "\n".join(lines)


def _code_extreme(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    big = rng.random() < 0.5
    name, word, cmp = ("largest", "largest", ">") if big else ("smallest", "smallest", "<")
    lines = [
        f"def {name}_{noun[:-1] if noun.endswith('s') else noun}({noun}):",
        f'    """Return the {word} value in {noun}."""',
        f"    best = {noun}[0]",
        f"    for value in {noun}[1:]:",
        f"        if value {cmp} best:",
        "            best = value",
        "    return best",
    ]
    return "\n".join(lines)


def _code_string(rng: random.Random) -> str:
    name, arg, doc, ret = rng.choice(STRING_FUNCS)
    text = f'def {name}({arg}):\n    """{doc}"""\n    {ret}'
    if rng.random() < 0.4:
        sample = rng.choice(("Ada", "hello world", "level", "Grace Hopper", "  bob  ", "python"))
        text += f'\n\n\nprint({name}("{sample}"))'
    return text


def _code_class(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    cls = noun.title().replace("_", "") + "Counter"
    step = rng.choice((1, 1, 2, 5))
    lines = [
        f"class {cls}:",
        f'    """Keep a running count of {noun}."""',
        "",
        "    def __init__(self):",
        "        self.count = 0",
        "",
        f"    def add(self, n={step}):",
        f'        """Add n {noun} and return the new count."""',
        "        self.count += n",
        "        return self.count",
    ]
    return "\n".join(lines)


def _code_snippet(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    nums = ", ".join(str(rng.randint(1, 50)) for _ in range(rng.randint(3, 6)))
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"# Compute the average of the {noun}\n{noun} = [{nums}]\n"
            f"average = sum({noun}) / len({noun})\nprint(average)"
        )
    if kind == 1:
        return f"# Sort the {noun} from high to low\n{noun} = [{nums}]\n{noun}.sort(reverse=True)\nprint({noun})"
    return (
        f"# Square every value in {noun}\n{noun} = [{nums}]\n"
        f"squares = [value * value for value in {noun}]\nprint(squares)"
    )


def _code_dict(rng: random.Random) -> str:
    key = rng.choice(("word", "name", "color", "city", "tag"))
    return "\n".join(
        [
            f"def count_{key}s({key}s):",
            f'    """Return a dictionary mapping each {key} to how often it appears."""',
            "    counts = {}",
            f"    for {key} in {key}s:",
            f"        counts[{key}] = counts.get({key}, 0) + 1",
            "    return counts",
        ]
    )


_CODE_KINDS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_code_binop, 0.16),
    (_code_count, 0.13),
    (_code_filter, 0.12),
    (_code_total, 0.1),
    (_code_extreme, 0.1),
    (_code_string, 0.12),
    (_code_class, 0.08),
    (_code_snippet, 0.11),
    (_code_dict, 0.08),
)


def make_code(rng: random.Random) -> dict[str, str]:
    """One short Python function or snippet ``{"text"}``."""
    fns, weights = zip(*_CODE_KINDS, strict=True)
    return {"text": rng.choices(fns, weights=weights)[0](rng)}


# --------------------------------------------------------------------------------------------
# Corpus assembly
# --------------------------------------------------------------------------------------------

MAKERS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "general": make_general,
    "math": make_math,
    "code": make_code,
}
KEYS: dict[str, str] = {"general": "text", "math": "question", "code": "text"}


def build_corpus(seed: int = 0, sizes: CorpusSizes | None = None) -> dict[str, list]:
    """Build every file's records in memory; keys are file names without the extension.

    ``calibration_general`` is a list of strings, everything else a list of dicts.  Heldout and
    distillation records are drawn after train so they can exclude anything already used.
    """
    sizes = sizes or CorpusSizes()
    out: dict[str, list] = {}
    for domain in DOMAINS:
        make, key = MAKERS[domain], KEYS[domain]
        seen: set[str] = set()
        n_train = getattr(sizes, f"{domain}_train")
        out[f"{domain}_train"] = _unique(make, random.Random(f"{seed}/{domain}/train"), n_train, seen, key)
        out[f"{domain}_heldout"] = _unique(make, random.Random(f"{seed}/{domain}/heldout"), sizes.heldout, seen, key)
        if domain == "math":
            out["math_problems"] = _unique(make, random.Random(f"{seed}/math/problems"), sizes.math_problems, seen, key)
        if domain == "general":
            calib = _unique(make, random.Random(f"{seed}/general/calibration"), sizes.calibration, seen, key)
            out["calibration_general"] = [r["text"] for r in calib]
    return out


def write_corpus(out_dir: Path, seed: int = 0, sizes: CorpusSizes | None = None) -> dict[str, Path]:
    """Write the corpus to ``out_dir`` and return the written paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, records in build_corpus(seed, sizes).items():
        if name == "calibration_general":
            path = out_dir / f"{name}.txt"
            path.write_text("\n".join(records) + "\n", encoding="utf-8")
        else:
            path = out_dir / f"{name}.jsonl"
            _write_jsonl(path, records)
        written[name] = path
    return written


def _write_jsonl(path: Path, records: Iterable[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Load a JSON Lines file written by :func:`write_corpus`."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = write_corpus(args.out, args.seed)
    total = 0
    for _name, path in sorted(written.items()):
        size = path.stat().st_size
        total += size
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path}  {n:6d} lines  {size / 1024:8.1f} KiB")
    print(f"total {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
