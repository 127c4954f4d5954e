"""The LMMR1Run API (`lmmr1.io/v1alpha1`): typed models, the single source of truth for the CRD."""

from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.api.status import LMMR1RunStatus

GROUP = "lmmr1.io"
VERSION = "v1alpha1"
KIND = "LMMR1Run"
PLURAL = "lmmr1runs"
SINGULAR = "lmmr1run"
SHORT_NAMES = ["lmr"]
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "LMMR1RunSpec",
    "LMMR1RunStatus",
]
