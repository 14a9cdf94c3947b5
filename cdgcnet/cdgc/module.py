"""Class-wise dynamic graph convolution (CDGC) module (Hu et al., ECCV 2020, sec. 3.3).

Legend: B batch, C channels, M classes, H x W feature grid, N = H*W nodes per image,
G graphs (M, or 1 for plain-GCN).

Given X (B, C, H, W) and coarse logits P (B, M, H, W) (and the target in training with "ds"):

1. node sets V_m (nodes.py, eq. 4), without gradient and outside any checkpointed region, so a
   recompute sees the same Bernoulli sample;
2. A_m = softmax of phi(x_i) . phi'(x_j) over the keys j (unscaled, eq. 2-3), phi, phi' bias-free
   C -> C maps shared by all classes; which nodes are queries and keys is the reading
   (``queries``: all_queries.py, members.py, masked.py);
3. Z_m = ReLU((A_m X_m) W_m^T), W_m the m-th C x C block of ``graph_weight`` (G*C, C, 1, 1);
4. R = ReLU(BN(conv1x1_{G*C -> C}(Z_1 .. Z_G))), ``aggregate_weight`` (C, G*C, 1, 1), bias-free
   as BN follows: the refined feature, returned before fusion.

``impl``: "fast" (default; fast.py + attention.py: a few large products per chunk of queries,
memory O(chunk x N), exact to the reference) or "dense" (each reading's literal reference,
(B, G, N, N) matrices, small N only). Two run policies are applied around the math, not inside
it: ``precision`` (precision.py: how the products are computed under a bf16/fp16 autocast
region; the graph's elementwise math is float32, float64 for float64 input) and ``checkpoint``
(steps 2-4 up to the aggregation under torch.utils.checkpoint; BN stays outside so its running
statistics are updated once per step). The fast path's backward already recomputes its chunks,
so checkpointing saves only the projections and the gathered keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from cdgcnet.cdgc.all_queries import AllQueries
from cdgcnet.cdgc.attention import DEFAULT_BUDGET
from cdgcnet.cdgc.fast import fast_context
from cdgcnet.cdgc.layout import build_layout
from cdgcnet.cdgc.masked import Masked
from cdgcnet.cdgc.members import Members
from cdgcnet.cdgc.nodes import (
    GRAPHS,
    PARTS,
    Sampling,
    check_ratio,
    coarse_masks,
    memberships,
    sampled_parts,
)
from cdgcnet.cdgc.precision import EXACT, POLICIES, Linear, Precision, compute_dtype

READINGS = {reading.name: reading for reading in (AllQueries(), Members(), Masked())}
QUERIES = tuple(READINGS)
IMPLS = ("fast", "dense")
PRECISIONS = tuple(POLICIES)
LEGACY_IMPLS = ("segmented", "jagged")
"""impl values of earlier versions, read as "fast" (configs stored in runs and checkpoints)."""

_WHERE = "cdgcnet/cdgc"


def _error(msg: str) -> ValueError:
    return ValueError(f"{_WHERE}: {msg}")


class Projection(nn.Linear):
    """phi or phi': a bias-free C -> C map whose product follows the precision policy. An
    nn.Linear (same state dict), called as a module so that ZeRO-3 gathers its weight."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, bias=False)

    def forward(self, x: Tensor, policy: Precision = EXACT) -> Tensor:
        return Linear.apply(x, self.weight, policy)


class CDGCModule(nn.Module):
    """Class-wise dynamic graph convolution; returns the refined feature R (B, C, H, W)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        graph: str = "ds",
        ratio: float = 1.0,
        parts: Sequence[str] = PARTS,
        impl: str = "fast",
        checkpoint: bool = False,
        class_wise: bool = True,
        ignore_index: int = 255,
        queries: str = "all",
        precision: str = "split",
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise _error(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise _error(f"num_classes must be a positive int, got {num_classes!r}")
        if graph not in GRAPHS:
            raise _error(f"graph must be one of {GRAPHS}, got {graph!r}")
        ratio = check_ratio(ratio, f"{_WHERE}: ratio")
        if isinstance(parts, str):
            raise _error(
                f"parts must be a sequence of names from {PARTS}, got the string {parts!r}"
            )
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise _error(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)!r}")
        if queries not in QUERIES:
            raise _error(f"queries must be one of {QUERIES}, got {queries!r}")
        if precision not in PRECISIONS:
            raise _error(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if graph == "ds" and class_wise and float(ratio) == 0.0 and tuple(parts) == ("easy",):
            raise _error(
                "graph='ds' with parts=('easy',) and ratio=0 samples no node at all in training"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.class_wise = bool(class_wise)
        self.sampling = Sampling(
            graph, float(ratio), tuple(p for p in PARTS if p in parts), ignore_index
        )
        self.queries = queries
        self.impl = impl
        self.checkpoint = bool(checkpoint)
        self.precision = precision
        self.budget = DEFAULT_BUDGET  # bytes of per-chunk temporaries on the fast path
        c, g = in_channels, self.num_groups
        self.phi = Projection(c)
        self.phi_prime = Projection(c)
        # The two 1x1 conv weights are this module's own parameters (used through matmuls), so
        # that ZeRO-3 gathers them for this module's forward.
        self.graph_weight = nn.Parameter(torch.empty(g * c, c, 1, 1))  # W_m: grouped, G groups
        self.aggregate_weight = nn.Parameter(torch.empty(c, g * c, 1, 1))  # G*C -> C
        for weight in (self.graph_weight, self.aggregate_weight):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.bn = nn.BatchNorm2d(c)

    # the rule's fields, read by callers and the configuration
    graph = property(lambda self: self.sampling.graph)
    ratio = property(lambda self: self.sampling.ratio)
    parts = property(lambda self: tuple(self.sampling.parts))
    ignore_index = property(lambda self: self.sampling.ignore_index)

    @property
    def num_groups(self) -> int:
        return self.num_classes if self.class_wise else 1

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value in LEGACY_IMPLS:
            value = "fast"
        if value not in IMPLS:
            raise _error(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"graph={self.graph!r}, ratio={self.ratio}, parts={self.parts}, "
            f"queries={self.queries!r}, impl={self.impl!r}, "
            f"checkpoint={self.checkpoint}, class_wise={self.class_wise}, "
            f"precision={self.precision!r}"
        )

    # ------------------------------------------------------------------ node sets

    def node_sets(self, coarse_logits: Tensor, target: Tensor | None = None) -> Tensor:
        """Memberships forward would use: bool (B, G, H, W) (G = M, or 1 for plain-GCN)."""
        self._check_logits(coarse_logits, None)
        b, _, h, w = coarse_logits.shape
        if target is not None:
            self._check_target(target, b)
        nodes, n_bad = self._memberships(coarse_logits, target, (b, h, w, coarse_logits.device))
        self._raise_bad_labels(int(n_bad))
        return nodes.view(b, -1, h, w)

    @torch.no_grad()
    def node_parts(self, coarse_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The dynamic-sampling node sets of eq. (4) split by part, drawn as graph='ds' training
        draws them (whatever the module's mode): the names of ``parts`` -> bool (B, M, H, W).
        "easy" holds the easy positives kept with probability ``ratio`` (torch's global RNG);
        the union of the parts is what ``node_sets`` returns for a training 'ds' module."""
        if not self.class_wise:
            raise _error("node_parts needs the class-wise module (plain-GCN has no class parts)")
        self._check_logits(coarse_logits, None)
        b, m, h, w = coarse_logits.shape
        self._check_target(target, b)
        parts, n_bad = sampled_parts(coarse_masks(coarse_logits), target, self.sampling, (h, w))
        self._raise_bad_labels(int(n_bad))
        return {name: part.view(b, m, h, w) for name, part in parts.items()}

    def _uses_target(self) -> bool:
        """Whether forward draws the node sets from the target (dynamic sampling in training)."""
        return self.class_wise and self.training and self.graph == "ds"

    def _memberships(self, coarse_logits, target, shape) -> tuple[Tensor, Tensor]:
        if not self.class_wise:
            return memberships(None, None, None, shape)
        uses_target = self._uses_target()
        if uses_target and target is None:
            raise _error(
                "graph='ds' in training needs the target (dynamic sampling uses the ground "
                "truth); pass target, use graph='sim', or call eval()"
            )
        return memberships(coarse_logits, target if uses_target else None, self.sampling, shape)

    def _raise_bad_labels(self, n_bad: int) -> None:
        if n_bad:
            raise _error(
                f"target holds {n_bad} pixel(s) with labels outside [0, {self.num_classes}) "
                f"that are not the ignore index {self.ignore_index}"
            )

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor, coarse_logits: Tensor | None = None, target: Tensor | None = None
    ) -> Tensor:
        """x (B, C, H, W), coarse_logits (B, M, H, W), target (B, h, w) -> R (B, C, H, W)."""
        self._check_x(x)
        b, _, h, w = x.shape
        if self.class_wise or coarse_logits is not None:
            self._check_logits(coarse_logits, x)
        if target is not None:
            self._check_target(target, b)
        nodes, n_bad = self._memberships(coarse_logits, target, (b, h, w, x.device))  # (B, G, N)
        layout = None
        if self.impl == "dense":
            self._raise_bad_labels(int(n_bad))
        else:
            layout, n_bad = build_layout(nodes, n_bad)  # the module's one host-device sync
            self._raise_bad_labels(n_bad)
        low = _autocast_lowers(x.device.type)
        policy = POLICIES[self.precision] if low else EXACT
        dtype = compute_dtype(x)

        def context(inp: Tensor) -> Tensor:
            return self._context(inp.to(dtype), nodes, layout, policy)

        with torch.autocast(x.device.type, enabled=False):
            if self.checkpoint and torch.is_grad_enabled():
                pre = _checkpoint(context, x, use_reentrant=False)
            else:
                pre = context(x)
        if not low:  # e.g. a half model under DeepSpeed fp16: BN's parameters are half
            pre = pre.to(x.dtype)
        return F.relu(self.bn(pre))

    def _context(self, x: Tensor, nodes: Tensor, layout, policy: Precision) -> Tensor:
        """Steps 2-4 up to the aggregation conv: x (B, C, H, W) -> R before BN (B, C, H, W)."""
        b, c, h, w = x.shape
        n, g = h * w, self.num_groups
        xf = x.permute(0, 2, 3, 1).reshape(b * n, c)  # (B*N, C)
        q = self.phi(xf, policy)  # (B*N, C)
        k = self.phi_prime(xf, policy)  # (B*N, C)
        graph = self.graph_weight.view(g, c, c).to(x.dtype)  # (G, C_out, C_in)
        agg = self.aggregate_weight.view(c, g, c).to(x.dtype)  # (C_out, G, C_in)
        reading = READINGS[self.queries] if self.class_wise else READINGS["all"]
        if layout is None:
            shaped = (t.view(b, n, c) for t in (q, k, xf))
            pre = reading.reference(*shaped, nodes, graph, agg)
        else:
            pre = fast_context(xf, q, k, nodes, layout, graph, agg, reading, policy, self.budget)
        return pre.view(b, c, h, w)

    # ------------------------------------------------------------------ validation

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise _error(f"x must be a (B, C, H, W) tensor, got {_shape(x)}")
        if not x.is_floating_point():
            raise _error(f"x must be floating point, got {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise _error(f"x has {x.shape[1]} channels, the module expects {self.in_channels}")

    def _check_logits(self, logits: Tensor | None, x: Tensor | None) -> None:
        if not isinstance(logits, Tensor) or logits.dim() != 4:
            raise _error(f"coarse_logits must be a (B, M, H, W) tensor, got {_shape(logits)}")
        if logits.shape[1] != self.num_classes:
            raise _error(
                f"coarse_logits has {logits.shape[1]} classes, the module was built for "
                f"num_classes={self.num_classes}"
            )
        if x is not None and (logits.shape[0], *logits.shape[2:]) != (x.shape[0], *x.shape[2:]):
            raise _error(
                f"coarse_logits {tuple(logits.shape)} does not match x {tuple(x.shape)} in "
                "batch or spatial size"
            )

    def _check_target(self, target: Tensor, batch: int) -> None:
        if not isinstance(target, Tensor) or target.dim() != 3:
            raise _error(f"target must be a (B, h, w) label tensor, got {_shape(target)}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise _error(f"target must hold integer labels, got {target.dtype}")
        if target.shape[0] != batch:
            raise _error(f"target batch {target.shape[0]} does not match x batch {batch}")


def _autocast_lowers(device_type: str) -> bool:
    """Whether an autocast region to a dtype below float32 is active for this device type."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (
        torch.bfloat16,
        torch.float16,
    )


def _shape(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
