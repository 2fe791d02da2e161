"""The five leukocyte classes and the folder-name aliases that map onto them.

Public datasets spell their class folders many ways (``NEUTROPHIL``, ``neut``,
``Neutrophils``, ``lymp``...). One function decides what a folder name means so
every loader agrees.
"""

from __future__ import annotations

import re

CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

# Prefixes that identify a class once a name is lower-cased and stripped of
# everything but letters. Longest first is not needed: the prefixes are disjoint.
_PREFIXES: dict[str, str] = {
    "bas": "basophil",
    "eos": "eosinophil",
    "lym": "lymphocyte",
    "mon": "monocyte",
    "neu": "neutrophil",
}


def canonical_class(name: str) -> str | None:
    """Return the class a folder or label name stands for, or None when it is none of ours.

    >>> canonical_class("Neutrophils"), canonical_class("LYMP"), canonical_class("ig")
    ('neutrophil', 'lymphocyte', None)
    """
    letters = re.sub(r"[^a-z]", "", name.lower())
    if len(letters) < 3:
        return None
    return _PREFIXES.get(letters[:3])
