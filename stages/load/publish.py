"""Cache folders that appear whole or not at all, so parallel jobs never read half a cache."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def publish(build, dest: Path) -> Path:
    """Build into a temp dir beside ``dest`` and rename: parallel jobs never see half a cache."""
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another job published first; theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
