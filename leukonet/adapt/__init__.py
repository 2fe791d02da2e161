"""Adapting a trained model to a new lab: its own unlabelled cells first, then the few it labels.

``python -m leukonet.adapt`` (``leukonet.adapt.run``) writes an adapted checkpoint; ``python -m
leukonet.adapt.suggest`` ranks the lab's unlabelled cells by how much labelling each would help.
"""
