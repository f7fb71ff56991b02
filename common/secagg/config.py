"""The round's secure-aggregation settings, as the researcher sends them in the setup request.

    SecaggConfig(threshold=3, degree=None, clipping_range=8.0, fraction_bits=32).fixed_point().capacity
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .fixedpoint import FixedPoint


class SecaggConfig(BaseModel):
    """`threshold`: shares needed to rebuild a secret (and the fewest nodes whose sum is ever revealed);
    `degree`: SecAgg+'s neighbours per node (None: every other node); the fixed-point encoding's parameters.

        SecaggConfig(threshold=2)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    threshold: int = Field(ge=2, le=65535)
    degree: int | None = Field(None, ge=2, le=65535)
    clipping_range: float = Field(8.0, gt=0, le=2.0**20)
    fraction_bits: int = Field(32, ge=0, le=52)

    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.clipping_range, self.fraction_bits)
