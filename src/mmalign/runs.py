"""What every run that writes a folder claims first: its launch is sane and nobody else writes there.

``claim_output(lock_file, what)`` is a context manager taken by every trainer (on ``run.output_dir``) and by the
BDHS run (on its output file and work folder):

- **launch check**: a process started as one of N (``WORLD_SIZE`` = N, set by torchrun / ``accelerate launch``)
  that accelerate nevertheless runs alone is refused. That is what ``accelerate launch`` with a multi-GPU config
  does on a machine without GPUs: N independent copies of the run, each believing it is the only one, all
  writing one folder. On CPU, ``python -m mmalign.cpu_launch N ...`` starts N real processes. Likewise a run
  that asked for FSDP or DeepSpeed (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) but that accelerate
  runs without it (it does so silently on CPU) is refused by ``check_backend``.
- **folder lock**: the main process holds an exclusive ``flock`` on ``lock_file`` for the whole run, and writes
  its pid, host and start time into it. A second run into the same folder fails at once with
  ``FolderInUse`` naming the holder; the kernel drops the lock when the holder dies (even by SIGKILL), so a
  lock file left by a dead run is simply taken over (with a warning naming the dead holder). The other
  processes of the launch learn the main process's verdict by a broadcast, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mmalign.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".mmalign.lock"


class FolderInUse(ConfigError):
    """Another live run holds the output's lock; the message names its pid and host."""


class TrainingStopped(RuntimeError):
    """A run stopped before an update that would have ruined its weights (a non-finite loss or gradient); the
    command line exits 1 (the input was fine, the run failed)."""


class BrokenLaunch(ConfigError):
    """The process was started as one of several, but runs alone (N independent copies of one run)."""


def check_world_size(num_processes: int) -> None:
    """Refuse a process that was launched as one of ``WORLD_SIZE`` > 1 but that accelerate runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != num_processes:
        raise BrokenLaunch(
            f"this process was launched as one of {world} (WORLD_SIZE={world}) but accelerate runs "
            f"{num_processes} process(es): {world} independent copies of one run would write one folder. A "
            "multi-GPU accelerate config on a machine without GPUs does this; on CPU start N processes with "
            "`python -m mmalign.cpu_launch N <mmalign arguments>`")


def check_backend(distributed_type: str) -> None:
    """Refuse a run whose launch asked for FSDP or DeepSpeed when accelerate set up ``distributed_type`` instead
    (accelerate 1.15 keeps FSDP and DeepSpeed for GPU-like devices and ignores the request elsewhere)."""
    for name, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(name, "false").lower() == "true" and distributed_type != wanted:
            raise BrokenLaunch(f"the launch asked for {wanted} ({name}=true) but accelerate runs {distributed_type}; "
                               f"accelerate uses {wanted} on GPUs only, so on this machine the run would silently "
                               "train without it")


def _holder(handle: IO[str]) -> dict:
    handle.seek(0)
    text = handle.read()
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable": text[:200]}


def _acquire(lock_file: Path, what: str) -> IO[str]:
    """Take the lock or raise FolderInUse; returns the open lock file (closing it releases the lock)."""
    if lock_file.parent.exists() and not lock_file.parent.is_dir():
        raise ConfigError(f"{what}: {str(lock_file.parent)!r} exists and is not a folder")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise FolderInUse(
            f"{what} is in use by another run (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}; lock {lock_file}): wait for it to end or write elsewhere"
        ) from None
    previous = _holder(handle)
    if previous:
        logger.warning("%s: taking over the lock left by pid %s on host %s, which is no longer running", what,
                       previous.get("pid", "?"), previous.get("host", "?"))
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                             "argv": sys.argv}) + "\n")
    handle.flush()
    return handle


def _release(handle: IO[str]) -> None:
    """Empty the lock file (a clean end leaves no holder to report) and drop the lock."""
    handle.seek(0)
    handle.truncate()
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _main_verdict(error: tuple[bool, str] | None) -> tuple[bool, str] | None:
    """The main process's lock verdict, on every process of the launch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def claim_output(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` for the duration of a run writing ``what`` (e.g. "output folder runs/x"), after the
    launch check; see the module docstring. Every process of the launch enters it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The process layout accelerate will use (it reads ACCELERATE_USE_CPU when an Accelerator is built; a bare
    # PartialState would not, and would settle a torchrun CPU launch as N separate processes).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state.num_processes)
    handle, error = None, None
    if state.is_main_process:
        try:
            handle = _acquire(Path(lock_file), what)
        except ConfigError as err:
            error = (isinstance(err, FolderInUse), str(err))
    error = _main_verdict(error)
    if error is not None:
        in_use, message = error
        raise (FolderInUse if in_use else ConfigError)(message)
    try:
        yield
    finally:
        if handle is not None:
            _release(handle)


def claim_folder(folder: str | Path) -> contextlib.AbstractContextManager[None]:
    """``claim_output`` on ``<folder>/.mmalign.lock``: the lock of a run's output folder."""
    return claim_output(Path(folder) / LOCK_FILE, f"output folder {str(folder)!r}")
