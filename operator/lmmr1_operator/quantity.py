"""Kubernetes quantities (`spec.QUANTITY_PATTERN`) as numbers, for what the trainer checks."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from lmmr1_operator.api.spec import QUANTITY_PATTERN

_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},  # k, not K
    **{f"{s}i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")},
}


def quantity_value(quantity: str) -> Decimal:
    """The exact value of a quantity: `256Gi` -> 274877906944, `500m` -> 0.5, `1e3` -> 1000."""
    match = re.match(QUANTITY_PATTERN, quantity)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in "eE" and suffix:
        return Decimal(number) * Decimal(10) ** int(suffix[1:].lstrip("+"))
    return Decimal(number) * _SUFFIX[suffix]


def quantity_bytes(quantity: str) -> int:
    """Whole bytes (rounded up, as the kubelet does) of a storage quantity."""
    return math.ceil(quantity_value(quantity))
