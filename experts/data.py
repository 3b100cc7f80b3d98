"""Training and evaluation data: JSONL reading, question/answer formatting, final-answer extractors.

A record is either `{"text": ...}` (loss on every token) or `{"question": ..., "answer": ...}`, which the
template turns into a prompt and an answer (loss on the answer tokens only):

    template "Question: {question}\\nAnswer: {answer}"
      prompt  "Question: <q>\\nAnswer:"         (everything before {answer}, trailing space moved to the answer)
      answer  " <a>"

Examples are tokenised by moe.model.text_batches.encode, as the demo backbone was trained: the tokenizer's special
prefix (if any), the text, then EOS, so an expert also learns where an answer stops.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from experts.config import DEFAULT_TEMPLATE
from moe.admission.behaviour import FINAL_ANSWER, normalise_number
from moe.admission.behaviour import final_answer as gsm8k_answer  # the number after the first `####`, normalised

logger = logging.getLogger(__name__)

Extractor = Callable[[str], str | None]


class DataFormatError(ValueError):
    """A data file or record that cannot be used as written."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: `prompt` is context (no loss), `target` is scored.

    For text records prompt is "" and target the whole text. `gold` is the reference final answer of a
    question/answer record (extracted from its answer), None otherwise.
    """

    prompt: str
    target: str
    gold: str | None = None

    @property
    def is_qa(self) -> bool:
        return bool(self.prompt)


@dataclass(frozen=True)
class Template:
    """A question/answer template with `{question}` and `{answer}`; the prompt is the part before `{answer}`."""

    text: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if "{question}" not in self.text or "{answer}" not in self.text:
            raise DataFormatError(f"template {self.text!r} must contain {{question}} and {{answer}}")
        if self.text.index("{answer}") < self.text.index("{question}"):
            raise DataFormatError(f"template {self.text!r} must place {{answer}} after {{question}}")

    def split(self, question: str) -> tuple[str, str]:
        """(prompt, answer prefix): the rendered text before `{answer}`, without trailing spaces; the
        removed spaces start the answer (BPE tokenizers attach a leading space to the next word)."""
        before, after = self.text.split("{answer}", 1)
        if after.strip():
            raise DataFormatError(f"template {self.text!r} must end with {{answer}}")
        rendered = before.replace("{question}", question)
        prompt = rendered.rstrip(" ")
        return prompt, rendered[len(prompt) :]

    def prompt(self, question: str) -> str:
        return self.split(question)[0]


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Records from a JSONL file, or one `{"text"}` record per non-empty line of any other text file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataFormatError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{number} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not ("text" in record or {"question", "answer"} <= record.keys()):
            raise DataFormatError(
                f'{path}:{number}: expected {{"text"}} or {{"question", "answer"}}, got {line[:80]!r}'
            )
        records.append(record)
    if not records:
        raise DataFormatError(f"data file {str(path)!r} holds no records")
    return records


def to_examples(records: list[dict[str, str]], template: Template, extractor: Extractor) -> list[Example]:
    examples = []
    for record in records:
        if "question" in record:
            prompt, lead = template.split(record["question"])
            examples.append(Example(prompt, lead + record["answer"], extractor(record["answer"])))
        else:
            examples.append(Example("", record["text"]))
    return examples


def load_examples(
    path: str | Path, template: Template | None = None, extractor: Extractor | None = None
) -> list[Example]:
    return to_examples(read_records(path), template or Template(), extractor or gsm8k_answer)


def shuffled_picks(count: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of indices into `count` items (training): a seeded shuffle, a fresh one appended whenever
    fewer than `batch_size` are left, so every item is seen once per pass."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(count))
            rng.shuffle(fresh)
            order.extend(fresh)
        picked, order = order[:batch_size], order[batch_size:]
        yield picked


def split_heldout(items: list, fraction: float, limit: int, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded shuffle, heldout = min(limit, fraction * len) items (at least 1)."""
    order = list(range(len(items)))
    random.Random(f"{seed}/heldout").shuffle(order)
    count = max(1, min(limit, int(len(items) * fraction)))
    if count >= len(items):
        raise DataFormatError(f"{len(items)} records are too few to hold {count} out; give --heldout FILE")
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# --- final-answer extractors --------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def last_number(text: str) -> str | None:
    """The last number in the text, normalised; None when there is none."""
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def cut_after_gsm8k_answer(text: str) -> str:
    """The text up to the end of its first `#### N` (what a model wrote after its final answer is noise)."""
    match = FINAL_ANSWER.search(text)
    return text[: match.end()] if match else text


EXTRACTORS: dict[str, Extractor] = {"gsm8k": gsm8k_answer, "last-number": last_number}


def get_extractor(spec: str) -> Extractor:
    """A built-in extractor by name (gsm8k, last-number) or any `module:function` taking text -> str | None."""
    if spec in EXTRACTORS:
        return EXTRACTORS[spec]
    if ":" not in spec:
        raise DataFormatError(f"extractor {spec!r} is not one of {sorted(EXTRACTORS)} nor a 'module:function'")
    module, name = spec.split(":", 1)
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DataFormatError(f"cannot import extractor {spec!r}: {e}") from e
    if not callable(function):
        raise DataFormatError(f"extractor {spec!r} is not callable")
    return function


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
