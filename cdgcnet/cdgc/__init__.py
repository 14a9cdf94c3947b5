"""The CDGC module (section 3.3) as a small package.

module.py     the module: parameters, forward, the run policies (precision, checkpointing)
nodes.py      node sets V_m (eq. 4)
all_queries.py, members.py, masked.py
              the three readings of section 3.3, each with its literal dense reference
attention.py  the class-block attention every reading's fast path runs (custom backward)
fast.py       the fast path over a batch; layout.py its index tensors (one host-device sync)
precision.py  how the products are computed (fp32, split bf16, bf16)
dense.py      pieces of the literal references
"""

from cdgcnet.cdgc.module import (
    IMPLS,
    LEGACY_IMPLS,
    PRECISIONS,
    QUERIES,
    READINGS,
    CDGCModule,
)
from cdgcnet.cdgc.nodes import GRAPHS, PARTS, check_ratio, resize_target

__all__ = [
    "GRAPHS",
    "IMPLS",
    "LEGACY_IMPLS",
    "PARTS",
    "PRECISIONS",
    "QUERIES",
    "READINGS",
    "CDGCModule",
    "check_ratio",
    "resize_target",
]
