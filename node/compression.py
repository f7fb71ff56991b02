"""The node's half of update compression (`common/codecs.py`): the `compress` stage, after the output
protections (`protect`: the codec encodes the clipped and noised update, never the raw one) and before
the upload. The researcher asked for the codec in its TrainRequest (`compression`, validated on receipt;
refused together with secure aggregation, whose masks need the plain encoding).

The daemon encodes numpy arrays (it imports no torch); stochastic rounding draws from numpy's PCG64 seeded with
128 bits from `secrets`. Error feedback's residual lives with the job's algorithm state, as SCAFFOLD's c_i:
`state/<researcher>/<job>/compression.safetensors` (float32, one tensor per floating-point model tensor).
The daemon reads it from the job's own folder, never from the worker's copy (plan code can write there), and
writes the new one into the round's scratch state, which `keep_state` makes the job's only after the upload:
a round that fails keeps the old residual, so nothing dropped is lost.

    run_stages([protect, compress, upload, keep_state], r)   # r.applied["compression"]: bytes sent, saved
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedsilo.common.errors import ErrorCode, SerializationError, UpdateRefused
from fedsilo.network.messages import TrainRequest

from .job_state import job_state_dir
from .stages import stage

if TYPE_CHECKING:
    from .daemon_round import DaemonRound

log = logging.getLogger(__name__)

RESIDUAL_FILE = "compression.safetensors"


@stage("update", ErrorCode.PARAMS_INVALID)
def compress(r: DaemonRound) -> None:
    """Encode `params` with the requested codec; keep the residual for the next round (see the module)."""
    (r.state_dir / RESIDUAL_FILE).unlink(missing_ok=True)  # only the daemon writes it, whatever the worker did
    spec = r.request.compression if isinstance(r.request, TrainRequest) else None
    if spec is None:
        return
    if r.request.secagg is not None:  # refused on receipt already; the masks must never see a codec blob
        raise UpdateRefused("compression and secure aggregation do not combine: masks need the plain encoding")
    import numpy as np

    from fedsilo.common.arrays import arrays_from_bytes, arrays_to_buffers
    from fedsilo.common.codecs_update import encode_update

    t0 = time.perf_counter()
    plain = r.worker_blobs["params"]
    residual = load_residual(job_state_dir(r.node.config.paths.state, r.request.sender, r.request.job_id))
    # stochastic rounding draws from the OS, as protection.py's noise: never from a seed anything else set
    generator = np.random.default_rng(secrets.randbits(128)) if spec.rounding == "stochastic" else None
    encoded = encode_update(arrays_from_bytes(plain, copy=False), r.received, spec,
                            residual if spec.error_feedback else None, generator)  # fmt: skip
    r.worker_blobs["params"] = data = encoded.to_bytes()
    if encoded.residual:  # written from the tensors' memory (a 40 MB join less for 10 M parameters)
        r.state_dir.mkdir(parents=True, exist_ok=True)
        with open(r.state_dir / RESIDUAL_FILE, "wb") as f:
            f.writelines(arrays_to_buffers(encoded.residual).buffers)
    r.applied["compression"] = {
        "requested": spec.model_dump(mode="json"), "applied": spec.codec, "bytes": len(data),
        "plain_bytes": len(plain), "error_feedback": bool(encoded.residual),
        "encode_s": round(time.perf_counter() - t0, 4)}  # fmt: skip


def load_residual(job_dir: Path) -> dict | None:
    """The job's residual (float32 arrays), or None (none yet, or unreadable: logged, and the round starts from
    zeros; a residual that does not fit the model is ignored by `encode_update`). The file's format did not
    change when the daemon left torch: a residual written before reads the same."""
    from fedsilo.common.arrays import arrays_from_bytes

    path = job_dir / RESIDUAL_FILE
    if not path.is_file():
        return None
    try:  # read into a buffer the tensors then view: no copy after the read
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
        return arrays_from_bytes(buf, copy=False)
    except (OSError, SerializationError) as exc:
        log.warning("compression residual %s unreadable, starting from zeros: %s", path, exc)
        return None
