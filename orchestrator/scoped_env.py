"""One environment variable set for the length of a block, then put back as it was.

For libraries that read a setting from the process environment only (Ray Train's worker-group
start timeout, MLflow's download progress bar): the setting applies to one call and never
leaks into the next one the same process makes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block; afterwards the earlier value, or no
    variable when there was none, even if the block raised."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
