"""A fourth synthetic domain for trying composition: cooking recipes, which the demo backbone never saw.

Each record is ``{"text"}``: a title, a servings/time line, an ingredient list with quantities and units, and
numbered steps with cooking verbs, temperatures and times. Train an expert on it beside the demo experts and
plug it (README, "Plugging a new domain"); the composition test (tests/demo/test_composition_pipeline.py)
does the same with few steps.

    python -m demo.recipes --out /tmp/recipes --seed 0   # recipes_train.jsonl (3000), recipes_heldout.jsonl (300)

Generation uses ``random.Random`` seeded with a string, as demo.corpus does: the same seed gives the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

from demo import domain_main, write_splits

ADJECTIVES = (
    "Smoky", "Golden", "Rustic", "Spiced", "Creamy", "Crispy", "Herbed", "Roasted", "Slow-cooked", "Zesty",
    "Honey-glazed", "Garlic", "Lemon", "Sticky", "Charred", "Braised",
)  # fmt: skip
MAINS = (
    "lentil", "chickpea", "barley", "mushroom", "aubergine", "cauliflower", "salmon", "chicken thigh",
    "pork shoulder", "tofu", "sweet potato", "squash", "cod", "lamb", "prawn", "fennel", "leek", "beetroot",
)  # fmt: skip
DISHES = (
    "stew", "soup", "curry", "risotto", "tagine", "bake", "gratin", "salad", "pilaf", "skewers", "hash",
    "broth", "ragout", "frittata", "fritters", "tart",
)  # fmt: skip
INGREDIENTS = (
    "olive oil", "butter", "garlic cloves", "onion", "shallots", "cumin seeds", "smoked paprika",
    "chilli flakes", "ground coriander", "turmeric", "fresh thyme", "rosemary", "bay leaves", "vegetable stock",
    "chopped tomatoes", "coconut milk", "double cream", "parmesan", "feta", "lemon juice", "soy sauce",
    "brown sugar", "plain flour", "white wine", "red wine vinegar", "dijon mustard", "ginger", "spinach",
    "parsley", "coriander leaves", "sesame oil", "pine nuts", "breadcrumbs", "eggs", "yoghurt", "capers",
)  # fmt: skip
UNITS = ("g", "ml", "tbsp", "tsp", "cups", "pinch of", "handful of", "cloves of", "tins of", "sprigs of")
VERBS = (
    "Heat", "Warm", "Melt", "Toast", "Whisk", "Stir in", "Fold in", "Season with", "Add", "Tip in", "Scatter over",
)  # fmt: skip
VESSELS = (
    "a large pan", "a heavy casserole", "a wok", "a deep frying pan", "a roasting tin", "a saucepan",
    "a baking dish", "a mixing bowl",
)  # fmt: skip
HEATS = ("low heat", "medium heat", "medium-high heat", "a gentle simmer", "a rolling boil")
DONENESS = (
    "until soft and translucent", "until golden at the edges", "until fragrant", "until thickened",
    "until the liquid has reduced by half", "until tender when pierced with a knife", "until just set",
    "until bubbling", "until crisp",
)  # fmt: skip
SERVING = (
    "Serve with crusty bread.", "Serve over steamed rice.", "Garnish with chopped herbs and serve hot.",
    "Leave to rest for 5 minutes before slicing.", "Finish with a squeeze of lemon.",
    "Spoon into warm bowls and top with yoghurt.", "Serve warm or at room temperature.",
)  # fmt: skip


def _quantity(rng: random.Random) -> str:
    unit = rng.choice(UNITS)
    if unit in ("g", "ml"):
        return f"{rng.choice((50, 75, 100, 125, 150, 200, 250, 300, 400, 500))}{unit}"
    if unit in ("pinch of", "handful of"):
        return f"{rng.choice(('1', '2', 'a'))} {unit}"
    if unit.endswith("of"):
        return f"{rng.randint(1, 4)} {unit}"
    return f"{rng.choice(('1/2', '1', '1 1/2', '2', '3'))} {unit}"


def make_recipe(rng: random.Random) -> dict[str, str]:
    """One recipe ``{"text"}``."""
    title = f"{rng.choice(ADJECTIVES)} {rng.choice(MAINS)} {rng.choice(DISHES)}"
    serves, prep = rng.randint(2, 8), rng.choice((5, 10, 15, 20, 25))
    cook = rng.choice((15, 20, 30, 40, 45, 60, 90))
    lines = [f"Recipe: {title}", f"Serves {serves}. Prep {prep} min. Cook {cook} min.", "Ingredients:"]
    ingredients = rng.sample(INGREDIENTS, rng.randint(4, 7))
    main = rng.choice(MAINS)
    lines.append(f"- {rng.choice((300, 400, 500, 600, 750))}g {main}")
    lines += [f"- {_quantity(rng)} {name}" for name in ingredients]
    lines.append("Method:")
    steps = []
    if rng.random() < 0.4:
        steps.append(f"Heat the oven to {rng.choice((160, 180, 190, 200, 220))}C.")
    steps.append(f"{rng.choice(VERBS)} the {ingredients[0]} in {rng.choice(VESSELS)} over {rng.choice(HEATS)}.")
    for name in ingredients[1 : rng.randint(3, len(ingredients))]:
        steps.append(
            f"{rng.choice(VERBS)} the {name} and cook for {rng.randint(1, 12)} minutes {rng.choice(DONENESS)}."
        )
    steps.append(
        f"Add the {main} and cook for {rng.choice((5, 8, 10, 15, 20, 25, 30))} minutes {rng.choice(DONENESS)}."
    )
    steps.append(rng.choice(SERVING))
    lines += [f"{number}. {step}" for number, step in enumerate(steps, 1)]
    return {"text": "\n".join(lines)}


def build_recipes(seed: int = 0, train: int = 3000, heldout: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records, distinct texts, the held-out ones never in train."""
    rng = random.Random(f"{seed}/recipes")
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < train + heldout:
        record = make_recipe(rng)
        if record["text"] not in seen:
            seen.add(record["text"])
            records.append(record)
    return records[:train], records[train:]


def write_recipes(out_dir: Path, seed: int = 0, train: int = 3000, heldout: int = 300) -> dict[str, Path]:
    return write_splits(out_dir, "recipes", build_recipes(seed, train, heldout))


def main(argv: list[str] | None = None) -> None:
    domain_main("recipes", __doc__, build_recipes, argv)


if __name__ == "__main__":
    main()
