"""The plugmoe_tiny task's data, found next to this file whatever the working directory (the task's
`custom_dataset`: lm-eval calls it with the task's metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).with_name("plugmoe_tiny.jsonl")


def load(**_metadata: Any) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(DATA)})
