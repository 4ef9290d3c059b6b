"""Start N mmalign processes on this machine's CPUs, joined over gloo: ``python -m mmalign.cpu_launch N ARGS``.

    python -m mmalign.cpu_launch 2 train dpo --config configs/lab_dpo.yaml run.output_dir=runs/dpo2
    python -m mmalign.cpu_launch 4 sample bdhs input=in.jsonl output=out.jsonl model=runs/base

``ARGS`` are those of the ``mmalign`` command. ``accelerate launch --cpu --num_processes N`` does not do this:
without MPI it starts one process; and a multi-GPU accelerate config on a machine without GPUs starts N
processes that each run alone (``mmalign.runs`` refuses both to write one folder). This launcher runs
``torchrun --standalone --nproc_per_node N -m mmalign.cli.main ARGS`` with ``ACCELERATE_USE_CPU=true``, which
makes accelerate join the N processes into one gloo group (``DistributedType.MULTI_CPU``), with any GPU hidden.
Each process uses ``OMP_NUM_THREADS`` threads (1 unless set). FSDP and DeepSpeed are GPU-only in accelerate 1.15:
under this launcher a run asking for them is refused (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys


def command(n_processes: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment that start ``n_processes`` CPU processes of ``mmalign args``."""
    if n_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {n_processes}")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_processes),
            "-m", "mmalign.cli.main", *args]
    # CUDA_VISIBLE_DEVICES="": on a machine with a GPU, accelerate would otherwise sync the gloo group through
    # CUDA barriers (seen failing on an H200 machine)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "1")
    return argv, env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit():
        sys.exit(f"usage: python -m mmalign.cpu_launch N MMALIGN-ARGS...\n\n{__doc__}")
    cmd, env = command(int(argv[0]), argv[1:])
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
