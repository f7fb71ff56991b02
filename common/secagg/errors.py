"""The one exception of the secure-aggregation pieces."""

from __future__ import annotations

from fedsilo.common.errors import FedsiloError


class SecaggError(FedsiloError):
    """A secure-aggregation step was refused or failed: a bad share, a stage out of order, too few parties.

        raise SecaggError("share from 'hospital-b' failed authentication")
    """
