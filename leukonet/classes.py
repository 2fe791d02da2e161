"""The five leukocyte classes and the folder-name aliases that map onto them.

Public datasets spell their class folders many ways (``NEUTROPHIL``, ``neut``,
``Neutrophils``, ``lymp``...). One function decides what a folder name means so
every loader agrees.
"""

from __future__ import annotations

import re

CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

def canonical_class(name: str) -> str | None:
    """Return the class a folder or label name stands for, or None when it is none of ours.

    Case, digits, punctuation and a plural ``s`` do not matter. A name counts if it is an
    abbreviation of a class (at least three letters: ``neut``, ``lymp``) or contains exactly one
    class name (``band_neutrophil``); blasts (``monoblast``, ``basophilic erythroblast``) and
    names of two classes at once are not ours.

    >>> canonical_class("Neutrophils"), canonical_class("LYMP"), canonical_class("ig")
    ('neutrophil', 'lymphocyte', None)
    >>> canonical_class("monoblast"), canonical_class("NEUTROPHIL, EOSINOPHIL")
    (None, None)
    """
    letters = re.sub(r"[^a-z]", "", name.lower())
    for word in (letters, letters.removesuffix("s")):  # "eos" is an abbreviation, "monocytes" a plural
        if len(word) >= 3:
            for cls in CLASSES:
                if cls.startswith(word):
                    return cls
    if "blast" in letters:
        return None
    named = [cls for cls in CLASSES if cls in letters]
    return named[0] if len(named) == 1 else None
