"""The one entry for data-parallel runs: torchrun, with no orphans and one-line failures.

    python -m unpaired.torchrun [torchrun options] -m MODULE [ARGS...]

It is torchrun (torch.distributed.run): torch's own option parser and elastic agent, run in this
process. The train stage's `cmd` in dvc.yaml launches through it with `--nproc-per-node
${train.devices}`; on several nodes each node runs it by hand with torchrun's rendezvous options.
What it adds to plain torchrun:

- **One process is the plain case.** `--nproc-per-node 1` on one node (no other torchrun option
  than `--standalone`): this process becomes `python -m MODULE ARGS` (exec, same PID) before torch
  is imported: no agent, no rendezvous, no process group, no second interpreter (plain torchrun
  adds about 3 s of start-up and a second process here).
- **No process of the run outlives whatever launched it.** Each worker is started as
  `python -m unpaired.torchrun --worker-of LAUNCHER_PID -- <what torchrun would run>`, which asks
  Linux for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG, kept across exec), checks that
  its parent is still LAUNCHER_PID (a launcher that died before the prctl is caught too) and execs
  the worker in the same process. This launcher gets SIGTERM when its own parent dies (dvc, a
  shell). SIGTERM, SIGINT and SIGHUP to the launcher stop every worker (torchrun's own handling:
  the signal to each worker's process group, SIGKILL after its shutdown timeout).
- **A bad process count is one line, before any process starts.** `--nproc-per-node` is checked
  first (check_processes): from dvc.yaml's cmd it is `train.devices`, and the line names that key
  (an integer from 1 to 64, at most one process per CPU core or per CUDA device).
- **A failure is one line.** torchrun's logs and its multi-line failure report are not printed.
  Each worker records what a one-process run would have printed (unpaired.distributed.session:
  `error: ...`, `interrupted`, or a bug's traceback) in the error file torchrun gives it, and
  prints nothing itself; this launcher prints the record of the rank that failed first, after one
  line naming that rank when it is not rank 0, and exits with its status. A worker that died
  without a record (kill -9) gets one line naming it and the signal; one that the agent's SIGTERM
  stopped before it could write a record never hides another rank's record (first_failure).

This module imports nothing heavy at the top: the worker start and the one-process exec run before
torch is imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any

from unpaired.files import atomic_write_json

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WORKER = "--worker-of"
INTERRUPTED = 130  # what unpaired.errors.main_guard exits with on Ctrl-C


def parent_death_signal(sig: int, parent: int | None = None) -> None:
    """Ask Linux to send `sig` to this process when the thread that started it ends (prctl
    PR_SET_PDEATHSIG; kept across exec, cleared in forked children). With `parent` (a PID): if
    this process's parent is no longer `parent` (it died before the prctl and this process was
    re-parented), send `sig` to this process now. Does nothing outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def record_failure(text: str, status: int) -> bool:
    """In a worker started by torchrun: write `text` (what this process would have printed to
    stderr: one line, or a traceback) and its exit status to the error file torchrun gave it
    (TORCHELASTIC_ERROR_FILE, torch's format: `message`, `timestamp` in whole seconds; `time_ns`
    orders failures finer). Returns False (and writes nothing) when not run by torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    now = time.time_ns()
    record = {"message": text, "timestamp": now // 1_000_000_000, "time_ns": now, "status": status}
    # whole or absent (its folder made if need be): the agent reads the file as soon as the worker has gone, and a half-written
    # one made the launcher's last line "error: torchrun: Expecting value: line 1 column 1"
    atomic_write_json(path, record)
    return True


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """(global rank, torch ProcessFailure) of the failure that came first: a worker that died
    without a record from anything but SIGTERM (killed from outside: kill -9, the out-of-memory
    killer, a crash), then the earliest record, then a worker SIGTERM stopped before it could write
    one. torchrun's agent stops the other workers with SIGTERM once it saw a failure, so a worker
    still starting up then (importing torch, before its handlers) dies of it without a record, or
    ends as interrupted (status 130) without one: that is never the cause when another worker
    recorded one (`train.devices: 3` on 2 cores: rank 0's error, not "rank 1 was killed by
    SIGTERM"; rank 1 killed from outside: its record, not "rank 0 exited with status 130")."""

    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        stamp = data.get("time_ns")
        if isinstance(stamp, int):
            return (1, stamp, rank)
        stopped = failure.exitcode in (-signal.SIGTERM, INTERRUPTED)
        return (2 if stopped else 0, 0, rank)

    return min(failures.items(), key=order)


def failure_report(failures: dict[int, Any]) -> tuple[str, int]:
    """The lines to print for torchrun's failed workers (global rank -> ProcessFailure), and the
    exit status: the first failure's own record (one line as a one-process run prints it), after
    a line naming its rank when that is not rank 0; one line for a worker killed without one."""
    rank, failure = first_failure(failures)
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    who = f"rank {rank} (PID {failure.pid})"
    if isinstance(data.get("time_ns"), int):
        text = str(data.get("message", "")).rstrip("\n")
        status = data.get("status") if isinstance(data.get("status"), int) else 1
        if rank != 0:
            text = f"{who} failed first; the other processes of the run were stopped\n{text}"
        return text, status
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with status {failure.exitcode}"
    return f"error: {who} {how}; the other processes of the run were stopped", 1


# train.devices's largest value (training.TrainParams.BOUNDS, the same number): checked here, before
# any process starts, and again by the stage.
MAX_PROCESSES = 64
NPROC_WORDS = (
    "cpu",
    "gpu",
    "auto",
    "xpu",
)  # torchrun's own --nproc-per-node values besides numbers


FLAGS = ("--standalone", "--no-python", "--run-path")  # torchrun's options that take no value


def _option(argv: list[str], name: str) -> str | None:
    """The value of torchrun option `name` (`--nproc-per-node`) in `argv` (`--name V`, `--name=V`,
    `--name_with_underscores`), before the script or `-m MODULE`; None when absent. Every option
    but FLAGS takes a value, as in torch.distributed.run's parser."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-m", "--module") or not arg.startswith("-"):
            return None
        key, eq, value = arg.partition("=")
        key = key.replace("_", "-")
        if key == name:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        i += 1 if eq or key in FLAGS else 2
    return None


def _params_devices() -> tuple[bool, Any, Any]:
    """(params.yaml sets train.devices, its value, train.device) read as DVC reads params.yaml;
    (False, None, None) when there is no such file or key, or it cannot be read (the stage says why)."""
    from unpaired import params

    try:
        train = params.section(params.load(), "train")
    except params.ParamsError:
        return False, None, None
    return "devices" in train, train.get("devices"), train.get("device", "auto")


def _as_dvc_writes(value: Any) -> str:
    """`${train.devices}` as DVC interpolates it into a stage's cmd."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_processes(argv: list[str]) -> None:
    """Before any process starts: raise UserError (one line) when `--nproc-per-node` asks for no
    process, for what is not a number, or for more processes than this node can hold. When its value
    is params.yaml's `train.devices` (dvc.yaml's cmd passes `${train.devices}`) the line names that
    key and checks its bounds (an integer from 1 to MAX_PROCESSES) and the machine: one CUDA device
    per process on CUDA (`train.device`), one CPU core per process on the CPU, a single device on
    MPS; by hand it names the option and checks that it is torchrun's. Reads nothing heavy unless
    several processes are asked for (then torch, which the launch imports anyway)."""
    value = _option(argv, "--nproc-per-node")
    if value is None or value == "1":
        return
    has, devices, device = _params_devices()
    if has and _as_dvc_writes(devices) == value:
        from unpaired import params

        key = "train.devices"
        params.check(
            isinstance(devices, int) and not isinstance(devices, bool),
            key,
            f"expected an integer (processes on this node), got {devices!r}",
        )
        params.check(devices >= 1, key, f"must be >= 1, got {devices}")
        params.check(
            devices <= MAX_PROCESSES,
            key,
            f"must be <= {MAX_PROCESSES}, got {devices}: processes "
            f"on one node, each with its own copy of the models",
        )
        from unpaired.devices import resolve_device
        from unpaired.threads import cpu_count

        kind = resolve_device(device if isinstance(device, str) else "auto").type
        if kind == "cuda":
            import torch

            have = torch.cuda.device_count()
            params.check(
                devices <= have,
                key,
                f"{devices} processes requested but only {have} CUDA "
                f"device(s) here; use {key}: {have} or less",
            )
        elif kind == "mps":
            params.fail(key, f"{devices} processes requested but MPS is one device; use {key}: 1")
        else:
            have = cpu_count()
            params.check(
                devices <= have,
                key,
                f"{devices} processes requested but only {have} CPU core(s) "
                f"here (each process needs one); use {key}: {have} or less",
            )
        return
    from unpaired.errors import UserError

    if value.isdigit():
        if int(value) < 1:
            raise UserError(f"unpaired.torchrun: --nproc-per-node: must be >= 1, got {value}")
    elif value not in NPROC_WORDS:
        raise UserError(
            f"unpaired.torchrun: --nproc-per-node: expected a number of processes (or "
            f"{', '.join(NPROC_WORDS)}), got {value!r}"
        )


def _one_process(argv: list[str]) -> list[str] | None:
    """The `python` arguments of the plain one-process case (`-m MODULE ARGS`, or `SCRIPT ARGS`)
    when argv asks for one process on one node with no other torchrun option than --standalone;
    else None (torchrun parses argv)."""
    values = {"--nproc-per-node": "1", "--nnodes": "1"}
    module, i = False, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        key = key.replace("_", "-")
        if arg in ("-m", "--module"):
            module = True
        elif arg == "--standalone":
            pass
        elif key in values and eq:
            values[key] = value
        elif key in values and i + 1 < len(argv):
            values[key] = argv[i + 1]
            i += 1
        elif arg.startswith("-"):
            return None
        else:
            break
        i += 1
    if (
        i == len(argv)
        or values["--nproc-per-node"] != "1"
        or values["--nnodes"] not in ("1", "1:1")
    ):
        return None
    return (["-m"] if module else []) + argv[i:]


def _worker(argv: list[str]) -> None:
    """`--worker-of PID -- COMMAND...`: the parent-death signal, then exec COMMAND (same PID)."""
    parent, sep, command = int(argv[0]), argv[1], argv[2:]
    assert sep == "--" and command, argv
    parent_death_signal(signal.SIGKILL, parent)
    os.execvp(command[0], command)


def _launch(argv: list[str]) -> int:
    """torchrun's parser and agent in this process, each worker started through _worker."""
    import logging

    logging.disable(
        logging.CRITICAL
    )  # the agent's logs: start, closing signals, the failure report

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from unpaired.threads import cpu_count

    args = get_args_parser().parse_args(argv)
    if args.run_path:
        print(
            "error: unpaired.torchrun: --run-path is not supported; use -m MODULE or a script path",
            file=sys.stderr,
        )
        return 2
    if str(args.nproc_per_node).isdigit():
        # torchrun would otherwise set 1 thread each with a banner; the processes split the cores
        os.environ.setdefault(
            "OMP_NUM_THREADS", str(max(1, cpu_count() // int(args.nproc_per_node)))
        )
    if args.no_python:
        command = [args.training_script]
    else:
        command = [
            os.getenv("PYTHON_EXEC", sys.executable),
            "-u",
            *(["-m"] if args.module else []),
            args.training_script,
        ]
    args.no_python, args.module, args.training_script = True, False, sys.executable
    args.training_script_args = [
        "-m",
        "unpaired.torchrun",
        WORKER,
        str(os.getpid()),
        "--",
        *command,
        *args.training_script_args,
    ]
    sys.stdout.flush()
    try:
        run(args)
    except SignalException:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except ChildFailedError as err:
        text, status = failure_report(err.failures)
        print(text, file=sys.stderr)
        return status
    except Exception as err:  # a rendezvous that failed or timed out, a port in use, ...
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: torchrun: {line}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        _worker(argv[1:])
        return
    parent_death_signal(signal.SIGTERM)  # the launcher's parent died: stop the run as on Ctrl-C
    from unpaired.errors import UserError

    try:
        check_processes(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    one = _one_process(argv)
    if one is not None:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *one])
    sys.exit(_launch(argv))


if __name__ == "__main__":
    main()
