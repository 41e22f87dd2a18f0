"""Where edgellm keeps what it builds: models converted on first use, kernels, extracted libraries.

The lowest layer: imports nothing of edgellm, so any module may ask for a path.
"""

from __future__ import annotations

import os
from pathlib import Path


def edgellm_home() -> Path:
    """`$EDGELLM_HOME`, or `~/.cache/edgellm`."""
    return Path(os.environ.get("EDGELLM_HOME") or Path.home() / ".cache" / "edgellm")
