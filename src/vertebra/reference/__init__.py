"""The paper facts table and the key maps that load torchvision/timm weights."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

FACTS_PATH = Path(__file__).with_name("architectures.tsv")


@lru_cache(maxsize=1)
def load_facts() -> dict[str, dict[str, str]]:
    """Rows of architectures.tsv keyed by registry name (empty cells are empty strings)."""
    with FACTS_PATH.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["name"]: {k: (v or "").strip() for k, v in r.items()} for r in rows}


def facts_for(name: str) -> dict[str, str]:
    return dict(load_facts().get(name, {}))
