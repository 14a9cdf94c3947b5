"""Upper bounds on config values that size what a run asks of the machine, and the folders a run
directory may not be. Each check returns the reason for refusing (None: allowed); launch.config
turns it into a ConfigError naming the key.

CPU: `data.num_workers` (loader processes per rank) at most the CPUs this process may use.

Memory: the bounds are floors of what training and inference cost per pixel, a little under
what the smallest model this project builds measured (ResNet-18, 16 channels, CPU: 1.8 kB per
training pixel with its backward, 750 B per inference pixel; bigger models cost more), against
the machine's memory (physical, or the cgroup's limit when lower; host memory also bounds a GPU
run, whose host holds at least one GPU's worth). A value refused here cannot run on this
machine; a value allowed may still need more than there is.
- a training step of one rank: data.batch_size x data.crop_size^2 pixels;
- an evaluation: the largest eval.scales^2 x the split's pixels per image (known from its
  manifest, so checked before training starts) and, per image, in predict.py.

Run directories: checkpoint rotation and log trimming delete files under the run dir, so it may
not resolve (through symlinks) to a filesystem root or top-level folder, the home directory, a
system tree (/usr, /etc, ...), this repository or a folder of its sources, or any folder that
holds this repository.
"""

from __future__ import annotations

import os
from pathlib import Path

TRAIN_BYTES_PER_PIXEL = 1024
INFERENCE_BYTES_PER_PIXEL = 512
REPO = Path(__file__).resolve().parent.parent
_SOURCE_DIRS = (".git", "cdgcnet", "launch", "pipeline", "sweeps", "tests", "benchmarks", "shards")
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                 "/sbin", "/sys", "/usr", "/var/lib", "/var/log", "/var/cache")  # fmt: skip


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def workers_problem(num_workers: int) -> str | None:
    cpus = cpu_count()
    if num_workers > cpus:
        return f"is more than the {cpus} CPUs this process may use"
    return None


def _memory_problem(need: float, what: str) -> str | None:
    have = memory_bytes()
    if need <= have:
        return None
    return f"asks for at least {_gib(need)} {what}, more than the {_gib(have)} of memory of this machine"


def training_memory_problem(batch_size: int, crop_size: int) -> str | None:
    """Why one rank's training step of batch_size crops of crop_size^2 cannot fit, or None."""
    need = batch_size * crop_size * crop_size * TRAIN_BYTES_PER_PIXEL
    return _memory_problem(
        need,
        f"per training step ({TRAIN_BYTES_PER_PIXEL} bytes per pixel of batch x crop^2 for the "
        "smallest model)",
    )


def inference_memory_problem(pixels: float, scale: float) -> str | None:
    """Why inference of an image of `pixels` pixels at `scale` cannot fit, or None."""
    return _memory_problem(
        pixels * scale * scale * INFERENCE_BYTES_PER_PIXEL,
        f"to run an image of {pixels:.0f} pixels at scale {scale:g} "
        f"({INFERENCE_BYTES_PER_PIXEL} bytes per pixel for the smallest model)",
    )


def pixels_per_image(manifest: dict) -> float:
    """Mean label pixels per image of a split, from its manifest's class histogram."""
    total = sum(manifest.get("class_histogram") or ()) + manifest.get("ignore_pixels", 0)
    return total / max(1, manifest.get("num_samples", 1))


def run_dir_problem(run_dir: str) -> str | None:
    """Why a run dir is no place for a run (resolved through symlinks), or None."""
    resolved = Path(os.path.realpath(os.path.expanduser(run_dir)))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if len(resolved.parts) <= 2:
        return "a filesystem root or a top-level directory"
    if resolved == home:
        return "the home directory"
    for tree in _SYSTEM_TREES:
        if resolved == Path(tree) or Path(tree) in resolved.parents:
            return f"inside the system directory {tree}"
    if resolved == REPO or resolved in REPO.parents:
        return f"this repository ({REPO}) or a folder holding it"
    for name in _SOURCE_DIRS:
        if resolved == REPO / name or REPO / name in resolved.parents:
            return f"inside the repository's {name}/"
    return None


def check_eval_scales(cfg) -> None:
    """ConfigError unless the largest of cfg.eval.scales can run the validation split's images
    (their mean size, from the manifest) in this machine's memory; nothing when the split has no
    readable manifest (check_data_root says so)."""
    from launch.config import ConfigError
    from pipeline.manifest import ManifestError, read_manifest

    split = Path(cfg.data.root) / cfg.data.val_split
    try:
        pixels = pixels_per_image(read_manifest(split))
    except (ManifestError, OSError):
        return
    scale = max(cfg.eval.scales)
    reason = inference_memory_problem(pixels, scale)
    if reason:
        raise ConfigError(f"eval.scales: {scale:g} {reason} (images of {split})")
