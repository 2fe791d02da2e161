"""The review station: the lab side of leukonet in one place.

A case (one slide or sample) collects uploaded images; every cell is classified once by the model (``predict``'s
cell finder, ``assess``, Grad-CAM) and kept in a database with its image, probabilities and flags; a technologist
reviews the cells in a queue, signs the count off, and the reviewed cells leave as a manifest that
``leukonet.adapt`` and ``leukonet.train`` read. ``app`` (HTTP routes and guards), ``access`` (who may connect),
``db`` (tables; ``migrations/``: the versioned schema), ``storage`` (image files by content hash), ``classify``
(bytes to cells), ``cases`` (cases, uploads, queue, reviews, sign-off, counts), ``exports`` (CSV, report,
manifest), ``export`` (the manifest command), ``static/`` (the page). Training and inference code stays where it
is; this package only calls it.
"""
