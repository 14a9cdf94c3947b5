"""The memberships of a batch laid out for the fast path, after one host-device sync.

Legend: B images, G graphs (classes, or 1 for plain-GCN), N nodes per image, T memberships
(image, class, node) in all, K' classes with at least one node in an image.

Two orders of the same T memberships:

- class-major (class, image, node): the rows of X that each class's W_m multiplies, so
  V' = X W_m^T is one grouped product over the classes present in the batch;
- image-major (image, class, node): per image, the keys of its classes one class after another,
  the order the class-block attention reads.

``to_image_major`` takes a class-major tensor to image-major order (one gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageKeys:
    """One image's keys: memberships ``span`` of the image-major order."""

    span: slice
    classes: Tensor  # (K',) int64 classes present in this image, ascending
    ends: list[int]  # (K',) cumulative ends of the class blocks (host)
    offsets: Tensor  # (K',) int32 cumulative ends of the class blocks
    key_class: Tensor  # (T_b,) int64 block (0..K'-1) of each key
    node: Tensor  # (T_b,) int64 node (0..N-1) of each key


@dataclass
class Layout:
    """Index tensors of the fast path for one batch (no gradient flows through them)."""

    rows_by_class: Tensor  # (T,) row b*N + n of X for each membership, class-major
    classes: Tensor  # (G',) int64 classes with a node somewhere in the batch, ascending
    class_ends: list[int]  # (G',) cumulative ends of their blocks in class-major order (host)
    class_offsets: Tensor  # (G',) int32, the same on the device
    to_image_major: Tensor  # (T,) class-major position of each image-major membership
    images: list[ImageKeys | None]  # None: the image has no node at all


def build_layout(nodes: Tensor, n_bad: Tensor) -> tuple[Layout, int]:
    """The layout of nodes (B, G, N) bool, and n_bad (a 0-dim count) read on the host.

    The module's one host-device sync: the segment sizes decide every shape below.
    """
    sizes = nodes.sum(-1).view(-1)  # (B*G,) image-major
    host = torch.cat([sizes, n_bad.to(sizes).view(1)]).tolist()
    return _layout(nodes, host[:-1]), host[-1]


def _layout(nodes: Tensor, host_sizes: list[int]) -> Layout:
    b, g, n = nodes.shape
    device = nodes.device
    per_image = [host_sizes[i * g : (i + 1) * g] for i in range(b)]
    per_class = [sum(sizes[c] for sizes in per_image) for c in range(g)]
    total = sum(per_class)
    present = [c for c in range(g) if per_class[c]]

    # image-major (image, class, node) and class-major (class, image, node) enumerations
    flat_im = torch.nonzero_static(nodes.reshape(-1), size=total).squeeze(1)  # (T,)
    flat_cm = torch.nonzero_static(nodes.transpose(0, 1).reshape(-1), size=total).squeeze(1)
    image, cls, node = flat_im // (g * n), flat_im // n % g, flat_im % n
    rank = torch.empty(g * b * n, dtype=torch.int64, device=device)
    rank[flat_cm] = torch.arange(total, device=device)  # class-major position, at members only

    # Every small host-known index in one transfer, sliced on the device: the batch's classes
    # and block ends, then per image its classes and block ends.
    mine = [[c for c in range(g) if sizes[c]] for sizes in per_image]
    ends = [_cumsum([sizes[c] for c in cs]) for sizes, cs in zip(per_image, mine, strict=True)]
    class_ends = _cumsum([per_class[c] for c in present])
    host = present + class_ends
    for cs, es in zip(mine, ends, strict=True):
        host += cs + es
    meta = _to_device(host, device)
    k = len(present)
    starts = [0, *_cumsum([sum(sizes) for sizes in per_image])]
    images: list[ImageKeys | None] = []
    at = 2 * k
    for i, (cs, es) in enumerate(zip(mine, ends, strict=True)):
        if not cs:
            images.append(None)
            continue
        kk = len(cs)
        classes, offsets = meta[at : at + kk], meta[at + kk : at + 2 * kk]
        at += 2 * kk
        span = slice(starts[i], starts[i + 1])
        block = torch.zeros(g, dtype=torch.int64, device=device)
        block[classes] = torch.arange(kk, device=device)  # class -> its block in this image
        images.append(
            ImageKeys(
                span=span,
                classes=classes,
                ends=es,
                offsets=offsets.int(),
                key_class=block[cls[span]],
                node=node[span],
            )
        )
    return Layout(
        rows_by_class=flat_cm % (b * n),
        classes=meta[:k],
        class_ends=class_ends,
        class_offsets=meta[k : 2 * k].int(),
        to_image_major=rank[cls * (b * n) + image * n + node],
        images=images,
    )


def _cumsum(values: list[int]) -> list[int]:
    """Cumulative ends: [2, 3] -> [2, 5]."""
    out: list[int] = []
    for v in values:
        out.append((out[-1] if out else 0) + v)
    return out


def _to_device(values: list[int], device: torch.device) -> Tensor:
    """int64 host values on ``device`` without a sync (page-locked source on CUDA)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
