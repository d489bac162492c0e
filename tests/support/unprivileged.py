"""Run a command that file permissions apply to. Root reads and writes through any mode bits:
as root the command runs without the capabilities that allow it (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH), so the owner's bits of a file count as for any user."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

BYPASSING_CAPABILITIES = "-dac_override,-dac_read_search"


def run_with_permissions(command: Sequence[str], timeout: float = 180) -> subprocess.CompletedProcess:
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without util-linux's setpriv: file permissions cannot be made to apply")
        prefix = [setpriv, "--bounding-set", BYPASSING_CAPABILITIES, "--"]
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout, check=False)
