"""Class-wise dynamic graph convolution (CDGC) module (Hu et al., ECCV 2020, sec. 3.3).

Legend: B batch, C channels, M classes, H x W feature grid, N = H*W nodes per image,
G graph groups (M, or 1 for plain-GCN), T number of (image, class, node) memberships.

What forward computes, given X (B, C, H, W) and coarse logits P (B, M, H, W):

1. Node sets V_m (``node_sets``), computed without grad and outside any checkpointed region,
   so a checkpoint recompute sees the same Bernoulli sample.
   - eval mode, and graph="sim" in training: V_m = C_m = [argmax P == m]; a pixel is in exactly
     one set.
   - graph="ds" in training, eq. (4): hard negatives C_m - G_m (ignore pixels excluded), hard
     positives G_m - C_m, and easy positives C_m & G_m kept with probability ``ratio``; ``parts``
     selects which of the three are used. G is the target resized to H x W (nearest); ignore
     pixels are in no G_m, so in training they are in no node set at all. One Bernoulli draw per
     pixel (an easy positive belongs to one class only), from torch's global RNG.
   - class_wise=False (plain-GCN, paper Table 1): one graph over all N nodes, no class split;
     graph/ratio/parts/target play no part and coarse_logits may be None.
2. A_m = softmax over j in V_m of phi(x_i) . phi'(x_j) (unscaled dot product, eq. 2-3), with
   phi, phi' bias-free linear maps C -> C shared by all classes.
3. Z_m = ReLU((A_m X_m) W_m), W_m the m-th group of a bias-free grouped 1x1 conv
   (``graph_weight`` (G*C, C, 1, 1)).
4. R = ReLU(BN(conv1x1_{G*C -> C}(Z_1 .. Z_G))) (``aggregate_weight`` (C, G*C, 1, 1), bias-free
   as BN follows): the refined feature, returned before fusion.

Section 3.3 admits two readings of which nodes are the rows (queries) of A_m, chosen by
``queries`` (default "all": the literal reading, and the one whose training graph does not leak
the labels; measured in REPRODUCING.md); the keys are V_m in both:

- "members": rows i in V_m only, so Z_m is zero outside V_m and a pixel receives the context of
  the (one or two) classes it is a member of. With graph="ds" in training the set of non-zero
  groups at a pixel then encodes its ground-truth label (every labelled pixel of class m is in
  V_m), which the aggregation conv can read and inference cannot supply.
- "all": the text's "M adjacency matrices A in R^{M x N x N}" taken literally: every node is a
  row of every class graph, so every pixel receives M class contexts (one per class with a
  non-empty V_m in its image; an empty V_m gives that class a zero context) and the aggregation
  conv weighs them. Membership decides only which nodes are keys.
plain-GCN (class_wise=False) has one graph over all nodes, where both readings coincide.

Three implementations share these parameters (``impl`` may be reassigned on an instance):

- "dense": the literal reference, builds the (B, G, N, N) masked adjacency and the
  (B, G*C, H, W) class maps, for both readings. Only usable at small N.
- "segmented" (default): memberships are sorted class-major into per-(class, image) segments
  and attention runs inside each segment with ``scaled_dot_product_attention(scale=1.0)``
  (flash / memory-efficient kernels on CUDA, the flash kernel on CPU). The per-class weights
  are applied per non-empty class, and since Z_m vanishes outside V_m the aggregation conv is
  a scatter-add of W_agg_m Z_m over memberships, so neither G x N x N nor (B, G*C, H, W) is
  ever built: memory is O(T*C), T <= 2*B*N. One host-device sync learns the segment sizes.
  (torch's ``varlen_attn`` is flash-only with head dim <= 256 and fp16/bf16, so C=512 cannot
  use it; per-segment calls are used instead. Length-bucketed padded batches, one SDPA and two
  bmm per bucket, were measured slower on CPU at M=19 and no faster at M=171 for S >= 49, see
  benchmarks/README.md.)
- "jagged": the segmented path with the attention of all segments in one
  ``scaled_dot_product_attention`` call on a jagged nested tensor, meant for CUDA, where torch
  can serve it with one variable-length fused kernel instead of a launch per segment (whether
  it does at C=512 is checked by tests/cdgcnet/test_gpu.py, not yet run). The segment offsets
  go to the device from page-locked memory and the known lengths are passed along, so it adds
  no sync. On CPU torch runs it as per-segment math, 2-7x slower than "segmented"
  (benchmarks/README.md). Opt-in until a GPU measurement shows it helps. Not with
  checkpoint=True: torch's checkpoint cannot save the nested tensors (it raises "NestedTensorImpl
  doesn't support sizes"), so that combination is refused with an error. Not with queries="all"
  (its queries are not segments), refused with an error.

With queries="all" the "segmented" impl streams over classes instead: for each class with
members, all N queries of each image attend to that image's keys in V_m (one
``scaled_dot_product_attention(scale=1.0)`` per (class, image)), then W_m, ReLU and W_agg_m, and
the result is added into one (B*N, C) buffer. Cost N * sum_m |V_m| * C instead of
sum_m |V_m|^2 * C; neither the (B, G*C, H, W) class maps nor any N x N matrix is built, and the
forward's working memory is O(B*N*C) besides the gathered keys and values (O(T*C)).

Precision: the unscaled dot-product softmax of eq. 2-3 is ill-conditioned, so bf16 rounding inside it
is amplified. Measured at C=512, M=19, 33x33, graph="ds", against a float64 copy fed the same bf16
input: under bf16 autocast the gradients of x, phi, phi' and W_m are off by 8-9% (relative L2) at
initialisation and by 15-16% with phi, phi' scaled x2 (a sharper, trained-like graph), while a
3x3 conv + BN + ReLU block is off by 3.6%. precision="fp32" (default) therefore runs steps 2-4 with
autocast off on a float32 copy of x (errors below 0.1%); precision="autocast" follows the
surrounding autocast, for users who accept that error for speed (benchmarks/README.md has the cost).
Plain float32 matmuls are not TF32 unless the user enables TF32 (torch's default is off for
matmuls); fp16 training through DeepSpeed casts the parameters themselves to half, so there the
module runs in half like the rest of the model.

checkpoint=True runs step 2-4 up to the aggregation conv under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; BN stays outside so its running
statistics are updated once per step. Gradients are identical with and without it. For the
streamed all-queries path each class's step is checkpointed on its own, so what is kept for
backward is O(B*N*C + T*C) instead of two (B*N, C) tensors per class, and the recompute holds
one class at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

GRAPHS = ("sim", "ds")
QUERIES = ("members", "all")
IMPLS = ("segmented", "dense", "jagged")
PARTS = ("easy", "hard_pos", "hard_neg")
PRECISIONS = ("fp32", "autocast")

_WHERE = "cdgcnet/cdgc.py"


def _error(msg: str) -> ValueError:
    return ValueError(f"{_WHERE}: {msg}")


def check_ratio(ratio: object, where: str = "ratio") -> float:
    """The easy-positive sampling ratio of dynamic sampling as a float in [0, 1]; a ValueError
    naming `where` otherwise. The one check of this rule (config, module, sweeps)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{where} must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


@dataclass
class _Plan:
    """Class-major membership layout for the segmented path (index tensors carry no grad)."""

    rows: Tensor  # (T,) row of each membership in the (B*N, C) node matrix
    seg_sizes: list[int]  # (G*B) segment lengths, ordered (class, image)
    class_sizes: list[int]  # (G) memberships per class


class CDGCModule(nn.Module):
    """Class-wise dynamic graph convolution; returns the refined feature R (B, C, H, W)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        graph: str = "ds",
        ratio: float = 1.0,
        parts: Sequence[str] = PARTS,
        impl: str = "segmented",
        checkpoint: bool = False,
        class_wise: bool = True,
        ignore_index: int = 255,
        queries: str = "all",
        precision: str = "fp32",
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
        self.graph = graph
        self.ratio = float(ratio)
        self.parts = tuple(p for p in PARTS if p in parts)
        self.queries = queries
        self.impl = impl
        self.checkpoint = bool(checkpoint)
        self.class_wise = bool(class_wise)
        self.ignore_index = ignore_index
        self.precision = precision
        c, g = in_channels, self.num_groups
        self.phi = nn.Linear(c, c, bias=False)
        self.phi_prime = nn.Linear(c, c, bias=False)
        # The two 1x1 conv weights are this module's own parameters (used through F.conv2d or
        # matmuls), so that ZeRO-3 gathers them for this module's forward in both paths.
        self.graph_weight = nn.Parameter(torch.empty(g * c, c, 1, 1))  # W_m: grouped, G groups
        self.aggregate_weight = nn.Parameter(torch.empty(c, g * c, 1, 1))  # G*C -> C
        for weight in (self.graph_weight, self.aggregate_weight):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.bn = nn.BatchNorm2d(c)

    @property
    def num_groups(self) -> int:
        return self.num_classes if self.class_wise else 1

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
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
        nodes, n_bad = self._memberships(coarse_logits, target, b, h, w, coarse_logits.device)
        self._raise_bad_labels(int(n_bad))
        return nodes.view(b, -1, h, w)

    def _uses_target(self) -> bool:
        return self.class_wise and self.training and self.graph == "ds"

    @torch.no_grad()
    def _memberships(
        self,
        coarse_logits: Tensor | None,
        target: Tensor | None,
        b: int,
        h: int,
        w: int,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """(B, G, N) bool memberships and a 0-dim count of out-of-range target labels."""
        n = h * w
        if not self.class_wise:
            return torch.ones(b, 1, n, dtype=torch.bool, device=device), torch.zeros(())
        m = self.num_classes
        pred = coarse_logits.argmax(1).view(b, n)  # (B, N)
        coarse = F.one_hot(pred, m).transpose(1, 2).bool()  # (B, M, N)  C_m
        if not self._uses_target():
            return coarse, torch.zeros((), device=pred.device)
        if target is None:
            raise _error(
                "graph='ds' in training needs the target (dynamic sampling uses the ground "
                "truth); pass target, use graph='sim', or call eval()"
            )
        parts, n_bad = self._sampled_parts(coarse, target, b, h, w)
        nodes = torch.zeros_like(coarse)
        for part in parts.values():
            nodes |= part
        return nodes, n_bad

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
        pred = coarse_logits.argmax(1).view(b, h * w)  # (B, N)
        coarse = F.one_hot(pred, m).transpose(1, 2).bool()  # (B, M, N)  C_m
        parts, n_bad = self._sampled_parts(coarse, target, b, h, w)
        self._raise_bad_labels(int(n_bad))
        return {name: part.view(b, m, h, w) for name, part in parts.items()}

    def _sampled_parts(
        self, coarse: Tensor, target: Tensor, b: int, h: int, w: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The parts of eq. (4) named in ``parts``, (B, M, N) bool each, given C_m (B, M, N);
        and a 0-dim count of out-of-range target labels."""
        m, n = self.num_classes, h * w
        gt = resize_target(target, (h, w)).view(b, n)  # (B, N)
        labelled = gt != self.ignore_index
        in_range = (gt >= 0) & (gt < m)
        n_bad = (labelled & ~in_range).sum()
        gt_onehot = F.one_hot(torch.where(in_range, gt, m), m + 1)[..., :m]  # (B, N, M)
        truth = gt_onehot.transpose(1, 2).bool()  # (B, M, N)  G_m
        parts = {}
        if "hard_neg" in self.parts:
            parts["hard_neg"] = coarse & ~truth & labelled[:, None]
        if "hard_pos" in self.parts:
            parts["hard_pos"] = truth & ~coarse
        if "easy" in self.parts and self.ratio > 0.0:
            easy = coarse & truth
            if self.ratio < 1.0:
                # An easy positive is in one class only, so one draw per pixel suffices.
                keep = torch.rand(b, 1, n, device=easy.device) < self.ratio
                easy &= keep
            parts["easy"] = easy
        return parts, n_bad

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
        if self._all_queries() and self.impl == "jagged":
            raise _error(
                "impl='jagged' cannot run with queries='all' (its queries are every node, not "
                "segments); use impl='segmented' or impl='dense'"
            )
        nodes, n_bad = self._memberships(coarse_logits, target, b, h, w, x.device)  # (B, G, N)
        checkpointed = self.checkpoint and torch.is_grad_enabled()
        if self.impl == "dense":
            self._raise_bad_labels(int(n_bad))

            def fn(inp: Tensor) -> Tensor:
                return self._dense(inp, nodes)
        elif self._all_queries():
            plan = self._plan(nodes, n_bad)
            per_class = checkpointed  # _streamed checkpoints class by class instead
            checkpointed = False

            def fn(inp: Tensor) -> Tensor:
                return self._streamed(inp, plan, per_class)
        else:
            plan = self._plan(nodes, n_bad)

            def fn(inp: Tensor) -> Tensor:
                return self._segmented(inp, plan)

        if checkpointed and self.impl == "jagged":
            raise _error(
                "impl='jagged' cannot run with checkpoint=True (torch's checkpoint cannot "
                "save nested tensors); use impl='segmented' or checkpoint=False"
            )
        full = self.precision == "fp32" and _autocast_lowers(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if full else nullcontext():
            inp = x.float() if full else x
            pre = _checkpoint(fn, inp, use_reentrant=False) if checkpointed else fn(inp)
        return F.relu(self.bn(pre))

    def _all_queries(self) -> bool:
        return self.class_wise and self.queries == "all"

    def _dense(self, x: Tensor, nodes: Tensor) -> Tensor:
        """Literal reference: (B, G, N, N) adjacency and (B, G*C, H, W) class maps."""
        b, c, h, w = x.shape
        g = nodes.shape[1]
        xf = x.flatten(2).transpose(1, 2)  # (B, N, C)
        scores = self.phi(xf) @ self.phi_prime(xf).transpose(1, 2)  # (B, N, N)
        # An empty class would give all -inf rows (NaN); let it attend anywhere, rows zeroed below.
        keys = nodes | ~nodes.any(-1, keepdim=True)  # (B, G, N)
        logits = scores[:, None].masked_fill(~keys[:, :, None, :], float("-inf"))  # (B, G, N, N)
        # Rows that get a context: V_m ("members"), or every node when V_m is not empty ("all").
        rows = nodes.any(-1, keepdim=True).expand_as(nodes) if self._all_queries() else nodes
        adj = logits.softmax(-1) * rows[..., None]  # (B, G, N, N), zero rows outside `rows`
        y = adj @ xf[:, None]  # (B, G, N, C)
        y = y.transpose(2, 3).reshape(b, g * c, h, w)  # (B, G*C, H, W)
        inside = rows.repeat_interleave(c, dim=1).view(b, g * c, h, w)
        z = F.relu(F.conv2d(y, self.graph_weight, groups=g)) * inside  # (B, G*C, H, W)
        return F.conv2d(z, self.aggregate_weight)  # (B, C, H, W)

    def _plan(self, nodes: Tensor, n_bad: Tensor) -> _Plan:
        b, g, n = nodes.shape
        by_class = nodes.transpose(0, 1).reshape(-1)  # (G*B*N,) class-major, then image, node
        sizes = nodes.sum(-1).transpose(0, 1).reshape(-1)  # (G*B,)
        # The one host-device sync: segment sizes (and the bad-label count riding along).
        host = torch.cat([sizes, n_bad.to(sizes).view(1)]).tolist()
        self._raise_bad_labels(host[-1])
        seg_sizes = host[:-1]
        flat = torch.nonzero_static(by_class, size=sum(seg_sizes)).squeeze(1)  # (T,)
        rows = flat % (b * n)  # (T,) = image * N + node
        class_sizes = [sum(seg_sizes[i * b : (i + 1) * b]) for i in range(g)]
        return _Plan(rows=rows, seg_sizes=seg_sizes, class_sizes=class_sizes)

    def _segmented(self, x: Tensor, plan: _Plan) -> Tensor:
        """Attention inside per-(class, image) segments, then a scatter-add aggregation."""
        b, c, h, w = x.shape
        g = self.num_groups
        xf = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*N, C)
        q = self.phi(xf)[plan.rows]  # (T, C)
        k = self.phi_prime(xf)[plan.rows]  # (T, C)
        v = xf[plan.rows]  # (T, C)
        if self.impl == "jagged":
            y = _jagged_attention(q, k, v, plan.seg_sizes)  # (T, C), class-major
        else:
            y = _segment_attention(q, k, v, plan.seg_sizes)
        # unbind (not indexing) so that backward stacks the per-class weight gradients once.
        w_graph = self.graph_weight.view(g, c, c).unbind(0)  # G x (C_out, C_in)
        w_agg = self.aggregate_weight.view(c, g, c).unbind(1)  # G x (C_out, C_in)
        # Only classes with members take part: an empty class's 0-row matmuls (and their
        # backward) cost a dispatch each for nothing and made the time grow with M. unbind's
        # backward still gives every class a (zero) gradient, as in the dense path
        # (distributed wrappers expect one); with no node at all (T = 0), class 0's 0-row
        # matmuls keep the weights in the graph.
        used = [m for m, size in enumerate(plan.class_sizes) if size] or [0]
        y_class = y.split(plan.class_sizes)
        contrib = [F.relu(y_class[m] @ w_graph[m].t()) @ w_agg[m].t() for m in used]
        u = torch.cat(contrib)  # (T, C)
        out = u.new_zeros(b * h * w, c).index_add_(0, plan.rows, u)  # (B*N, C)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last memory

    def _streamed(self, x: Tensor, plan: _Plan, checkpointed: bool) -> Tensor:
        """queries="all": per class, every node attends to V_m; W_agg_m Z_m summed per image."""
        b, c, h, w = x.shape
        n, g = h * w, self.num_groups
        xf = x.permute(0, 2, 3, 1).reshape(b * n, c)  # (B*N, C)
        q = self.phi(xf).view(b, n, c)  # (B, N, C): every node is a query
        # unbind (not indexing) so that backward stacks the per-image query gradients once.
        q_img = q.unbind(0)  # B x (N, C)
        k = self.phi_prime(xf)[plan.rows]  # (T, C), class-major (class, image) segments
        v = xf[plan.rows]  # (T, C)
        w_graph = self.graph_weight.view(g, c, c).unbind(0)  # G x (C_out, C_in)
        w_agg = self.aggregate_weight.view(c, g, c).unbind(1)  # G x (C_out, C_in)
        k_seg, v_seg = k.split(plan.seg_sizes), v.split(plan.seg_sizes)
        # One (N, C) accumulator per image (no index tensor to copy to the device); an image
        # whose every V_m is empty stays None and gets zeros.
        acc: list[Tensor | None] = [None] * b
        for m in range(g):
            images = [i for i in range(b) if plan.seg_sizes[m * b + i]]
            if not images:  # V_m empty in every image: class m adds nothing
                continue
            queries = [q_img[i] for i in images]  # each (N, C)
            keys = [k_seg[m * b + i] for i in images]  # each (L_i, C)
            values = [v_seg[m * b + i] for i in images]
            args = (w_graph[m], w_agg[m], *queries, *keys, *values)
            if checkpointed:
                u = _checkpoint(_class_context, *args, use_reentrant=False)
            else:
                u = _class_context(*args)  # (B_m, N, C)
            for i, u_i in zip(images, u.unbind(0), strict=True):
                acc[i] = u_i if acc[i] is None else acc[i] + u_i
        if all(a is None for a in acc):
            # No node at all (T = 0): keep every weight in the graph so it gets a (zero) gradient,
            # as in the dense path.
            zero = 0.0 * (q.sum() + k.sum() + self.graph_weight.sum() + self.aggregate_weight.sum())
            acc = [zero.expand(n, c)] * b
        out = torch.stack([xf.new_zeros(n, c) if a is None else a for a in acc])  # (B, N, C)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last memory

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


def _segment_attention(q: Tensor, k: Tensor, v: Tensor, sizes: list[int]) -> Tensor:
    """Unscaled softmax attention inside each contiguous segment of rows; (T, C) -> (T, C)."""
    # split (not slicing) so that backward concatenates the segment gradients once, instead of
    # writing each into its own zero-filled (T, C) tensor.
    outs = [
        F.scaled_dot_product_attention(qs[None, None], ks[None, None], vs[None, None], scale=1.0)
        for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
        if qs.shape[0]
    ]  # (1, 1, L, C) each
    if not outs:  # no node at all (T = 0): keep phi, phi' in the graph so they get (zero) grads
        return v + 0.0 * (q + k)  # (0, C)
    return torch.cat(outs, dim=2)[0, 0]


def resize_target(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Ground truth (B, h, w) -> (B, H, W) long on the feature grid by nearest neighbour: the
    G of dynamic sampling (eq. 4). Labels pass unchanged (no interpolation between ids)."""
    target = target.long()
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].long()


def _class_context(w_graph: Tensor, w_agg: Tensor, *qkv: Tensor) -> Tensor:
    """W_agg_m ReLU(W_m softmax(Q K_m^T) V_m) over some images of one class -> (B_m, N, C).

    qkv: the queries of each image (N, C), then the keys of its V_m, then their values
    (L_i, C) with L_i > 0, for B_m images.
    """
    b_m = len(qkv) // 3
    queries, keys, values = qkv[:b_m], qkv[b_m : 2 * b_m], qkv[2 * b_m :]
    y = torch.cat(
        [
            F.scaled_dot_product_attention(
                qs[None, None], ks[None, None], vs[None, None], scale=1.0
            )
            for qs, ks, vs in zip(queries, keys, values, strict=True)
        ],
        dim=2,
    )[0, 0]  # (B_m*N, C)
    u = F.relu(y @ w_graph.t()) @ w_agg.t()  # (B_m*N, C)
    return u.view(b_m, -1, u.shape[1])


def _device_offsets(lengths: list[int], device: torch.device) -> Tensor:
    """(S+1,) int64 segment starts on device, copied without a sync (page-locked on CUDA)."""
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    if device.type != "cuda":
        return offsets.to(device)
    return offsets.pin_memory().to(device, non_blocking=True)


def _jagged_attention(q: Tensor, k: Tensor, v: Tensor, sizes: list[int]) -> Tensor:
    """The attention of _segment_attention in one SDPA call over a jagged (S, 1, j, C) batch."""
    lengths = [size for size in sizes if size]
    if not lengths:  # no node at all (T = 0): as in _segment_attention
        return v + 0.0 * (q + k)  # (0, C)
    offsets = _device_offsets(lengths, q.device)  # (S+1,)

    def jagged(t: Tensor) -> Tensor:  # (T, C) -> (S, 1, j, C)
        nested = torch.nested.nested_tensor_from_jagged(
            t, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths)
        )
        return nested.unflatten(-1, (1, t.shape[1])).transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), scale=1.0)
    return out.transpose(1, 2).values().flatten(-2)  # (T, C)


def _shape(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
