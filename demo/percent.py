"""A neighbouring synthetic domain for trying routing: percentage, discount and interest word problems.

Unlike recipes (demo/recipes.py), which share almost nothing with the demo experts' domains, this domain is
built to overlap the demo math expert's: the same ``{"question", "answer"}`` records rendered as
``Question: ...\\nAnswer: ...``, the same people, goods and dollars, the same "A ... costs N dollars. <name>
buys ..." sentences, step lines that each hold one ``x op y = r`` and a GSM8K-style ``#### N`` final line. What
is new is the arithmetic: percentages of an amount (``80 * 25 / 100 = 20``), discounts, price rises and
sales tax, simple interest over years, shares of a group, and "what percent" questions. Every answer is an
integer (amounts are drawn so that each percentage divides evenly).

A router that looks at one token's hidden state sees mostly math-like tokens here ("costs", "dollars",
"buys", digits, "="); what tells the domains apart is the sequence ("%", "discount", "interest", "/ 100").
tests/demo/test_percent.py measures the overlap with the math vocabulary.

    python -m demo.percent --out /tmp/percent --seed 0   # percent_train.jsonl (3000), percent_heldout.jsonl (300)

Generation uses ``random.Random`` seeded with a string, as demo.corpus does: the same seed gives the same files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from demo import domain_main, write_splits
from demo.corpus import GOODS, PEOPLE

# Percentages a problem may use; each draw picks an amount that the percentage divides evenly.
PERCENTS = (5, 10, 15, 20, 25, 30, 40, 50, 60, 75)
# (singular, plural) goods beyond demo math's GOODS, priced in tens of dollars.
BIG_GOODS = (
    ("jacket", "jackets"), ("bike", "bikes"), ("lamp", "lamps"), ("chair", "chairs"), ("watch", "watches"),
    ("game", "games"), ("coat", "coats"), ("radio", "radios"), ("tent", "tents"), ("guitar", "guitars"),
)  # fmt: skip
SHOPS = ("shop", "store", "market stall", "bookshop", "toy shop")
GROUP_ITEMS = (
    ("marbles", "red"), ("apples", "green"), ("cards", "blue"), ("balloons", "yellow"), ("flowers", "white"),
    ("stickers", "shiny"), ("books", "new"), ("coins", "old"), ("shells", "striped"), ("pencils", "sharp"),
)  # fmt: skip
ACCOUNTS = ("a savings account", "a bank account", "a savings plan", "a deposit account")
TESTS = ("questions on a test", "shots at the goal", "problems in a quiz", "free throws")


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """One step line's ``a op b = r`` with op in ``+ - *``, as demo.corpus writes them."""
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {r}", r


def _percent_of(amount: int, percent: int) -> tuple[str, int]:
    """``amount * percent / 100 = r``; the caller draws amounts that make r an integer."""
    part, rest = divmod(amount * percent, 100)
    assert rest == 0, (amount, percent)
    return f"{amount} * {percent} / 100 = {part}", part


def _amount(rng: random.Random, percent: int, low: int, high: int) -> int:
    """An amount in [low, high] of which ``percent`` percent is a whole number."""
    choices = [a for a in range(low, high + 1) if a * percent % 100 == 0]
    return rng.choice(choices)


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(PEOPLE)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _discount(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    good, _goods = rng.choice(BIG_GOODS)
    p = rng.choice(PERCENTS)
    price = _amount(rng, p, 20, 200)
    s1, off = _percent_of(price, p)
    s2, pay = _step(price, "-", off)
    shop = rng.choice(SHOPS)
    q = f"A {good} costs {price} dollars. The {shop} gives a {p}% discount. How much does {name} pay for the {good}?"
    a = f"The discount is {s1} dollars.\n{name} pays {s2} dollars.\n#### {pay}"
    return {"question": q, "answer": a}


def _sale_many(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    good, goods = rng.choice(GOODS)
    k = rng.randint(2, 6)
    p = rng.choice(PERCENTS)
    # the total k * price must divide evenly
    price = rng.choice([c for c in range(2, 31) if k * c * p % 100 == 0] or [20])
    s1, total = _step(k, "*", price)
    s2, off = _percent_of(total, p)
    s3, pay = _step(total, "-", off)
    q = (
        f"A {good} costs {price} dollars. {name} buys {k} {goods} and gets {p}% off the total. "
        f"How much does {pr} spend?"
    )
    a = f"The {goods} cost {s1} dollars.\nThe discount is {s2} dollars.\n{_cap(pr)} spends {s3} dollars.\n#### {pay}"
    return {"question": q, "answer": a}


def _rise(rng: random.Random) -> dict[str, str]:
    good, _goods = rng.choice(BIG_GOODS)
    tax = rng.random() < 0.5
    p = rng.choice((5, 10, 15, 20, 25) if tax else PERCENTS)
    price = _amount(rng, p, 20, 200)
    s1, up = _percent_of(price, p)
    s2, new = _step(price, "+", up)
    if tax:
        name = _person(rng)[0]
        q = f"A {good} costs {price} dollars before tax. The sales tax is {p}%. How much does {name} pay in total?"
        a = f"The tax is {s1} dollars.\nThe total is {s2} dollars.\n#### {new}"
    else:
        q = f"A {good} costs {price} dollars. The price goes up by {p}%. What is the new price of the {good}?"
        a = f"The price rises by {s1} dollars.\nThe new price is {s2} dollars.\n#### {new}"
    return {"question": q, "answer": a}


def _interest(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    p = rng.choice((2, 3, 4, 5, 6, 8, 10))
    years = rng.randint(2, 6)
    money = rng.choice([m for m in range(50, 1001, 50) if m * p % 100 == 0])
    s1, yearly = _percent_of(money, p)
    s2, interest = _step(yearly, "*", years)
    q = (
        f"{name} puts {money} dollars in {rng.choice(ACCOUNTS)} that pays {p}% simple interest each year. "
        f"How much {{ask}} after {years} years?"
    )
    steps = [f"Each year the interest is {s1} dollars.", f"In {years} years it is {s2} dollars."]
    if rng.random() < 0.5:
        q = q.format(ask=f"interest does {pr} earn")
        steps.append(f"#### {interest}")
    else:
        s3, total = _step(money, "+", interest)
        q = q.format(ask=f"money does {pr} have")
        steps += [f"{_cap(pr)} has {s3} dollars.", f"#### {total}"]
    return {"question": q, "answer": "\n".join(steps)}


def _share(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    items, colour = rng.choice(GROUP_ITEMS)
    p = rng.choice(PERCENTS)
    n = _amount(rng, p, 10, 120)
    s1, part = _percent_of(n, p)
    if rng.random() < 0.5:
        q = f"{name} has {n} {items}. {p}% of them are {colour}. How many {items} are {colour}?"
        a = f"The {colour} {items} are {s1}.\n#### {part}"
    else:
        s2, rest = _step(n, "-", part)
        q = f"{name} has {n} {items}. {p}% of them are {colour}. How many {items} are not {colour}?"
        a = f"The {colour} {items} are {s1}.\nThe others are {s2}.\n#### {rest}"
    return {"question": q, "answer": a}


def _what_percent(rng: random.Random) -> dict[str, str]:
    name, pr, _ = _person(rng)
    total = rng.choice((4, 5, 10, 20, 25, 50))
    hits = rng.randint(1, total)
    pct, rest = divmod(hits * 100, total)  # total divides 100, so rest is 0
    assert rest == 0, (hits, total)
    q = f"{name} gets {hits} of {total} {rng.choice(TESTS)} right. What percent of them does {pr} get right?"
    a = f"{name} gets {hits} * 100 / {total} = {pct} percent.\n#### {pct}"
    return {"question": q, "answer": a}


_KINDS: tuple[tuple[Callable[[random.Random], dict[str, str]], float], ...] = (
    (_discount, 0.2),
    (_sale_many, 0.15),
    (_rise, 0.2),
    (_interest, 0.2),
    (_share, 0.15),
    (_what_percent, 0.1),
)


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem ``{"question", "answer"}``; the answer's last line is ``#### N``."""
    makers, weights = zip(*_KINDS, strict=True)
    return rng.choices(makers, weights=weights)[0](rng)


def format_problem(record: dict[str, str]) -> str:
    """The record as the experts tooling's default template renders it (demo.corpus.format_math's text)."""
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def build_percent(seed: int = 0, train: int = 3000, heldout: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records with distinct questions, the held-out ones never in train."""
    rng = random.Random(f"{seed}/percent")
    seen: set[str] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < train + heldout:
        attempts += 1
        if attempts > 50 * (train + heldout):
            raise RuntimeError(f"could not draw {train + heldout} distinct problems; template space too small")
        record = make_problem(rng)
        if record["question"] not in seen:
            seen.add(record["question"])
            records.append(record)
    return records[:train], records[train:]


def write_percent(out_dir: Path, seed: int = 0, train: int = 3000, heldout: int = 300) -> dict[str, Path]:
    return write_splits(out_dir, "percent", build_percent(seed, train, heldout))


def main(argv: list[str] | None = None) -> None:
    domain_main("percent", __doc__, build_percent, argv)


if __name__ == "__main__":
    main()
