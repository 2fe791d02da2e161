"""The image store: files named by the SHA-256 of their bytes (``ab/abcdef....png``), so an image is kept once
however often it is uploaded, a name can never be chosen by a user, and a file is either whole or absent
(written to a temporary file, flushed to disk, then renamed into place)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str, suffix: str) -> Path:
        if not SHA256.fullmatch(digest) or suffix not in SUFFIXES:
            raise ValueError(f"not a stored image name: {digest!r}{suffix!r}")
        return self.root / digest[:2] / f"{digest}{suffix}"

    def put(self, data: bytes, suffix: str) -> str:
        """Store ``data`` (once) and return its SHA-256."""
        digest = sha256(data)
        path = self.path(digest, suffix)
        if path.is_file() and path.stat().st_size == len(data):
            return digest
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def verify(self, digest: str, suffix: str) -> bool:
        """The file is there and its bytes still hash to its name."""
        path = self.path(digest, suffix)
        return path.is_file() and sha256(path.read_bytes()) == digest
