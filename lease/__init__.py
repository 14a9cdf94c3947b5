"""The GPU lease: the project's whole GPU check in one command that fits one short GPU lease.

Run from the repository root, on the bare GPU image with nothing installed:
`python3 -m lease --out DIR` (see `lease/__main__.py` and benchmarks/README.md, "How to spend
a GPU lease"). The modules:

    __main__      the command line
    context       the GPU and dry-run sizes, the stage names, what a stage process knows
    supervisor    the lease: one process group per stage, deadlines, the closing summary
    results       lease.json, rewritten whole after every step, and lease.log
    stage_process the body of one stage's process
    absent        the import blocker (MLflow and Ray are not on the GPU image)
    wheels        the wheels the lease carries to the image, built here, installed there
    data          the generated Cityscapes-layout set the trainer stage trains on
    env, gpu_tests, cdgc, trainer (+ trainer_run), train_step, extras: the six stages
    measure       the device and the matmul peak the stages share
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The checkout the lease runs from: the stages' working folder and first PYTHONPATH entry."""
