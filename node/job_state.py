"""Where a job's algorithm state lives on the node (SCAFFOLD's c_i, error feedback's residual). Kept apart
from `algorithms/`, whose hooks import torch: the daemon copies these folders and imports no torch.

    job_state_dir(paths.state, request.sender, request.job_id)   # root/<researcher>/<job_id>
"""

from __future__ import annotations

import re
from pathlib import Path

from fedsilo.common.algorithms import AlgorithmError

_PART = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def job_state_dir(root: Path, researcher: str, job_id: str) -> Path:
    """`root/<researcher>/<job_id>`: keyed by the researcher as well, because job ids are chosen by
    researchers and one must not read or overwrite another's state by reusing its job id."""
    for part in (researcher, job_id):
        if not _PART.match(part) or set(part) == {"."}:
            raise AlgorithmError(f"'{part}' cannot name a state folder")
    return root / researcher / job_id
