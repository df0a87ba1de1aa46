"""What every speed benchmark shares: the one timing loop, and the worker processes of the comparative ones.

A comparative benchmark (bench_train, bench_decode) runs each contender in its own process: torch and XLA in one
process slow each other down (torch's OpenMP threads up to 17x), so the parent imports neither. It starts one
worker per contender (`python -m <module> --worker=<spec-json>`, cwd the repository root) and talks to it over its
stdin/stdout, one JSON object a line: the worker first answers {"ready": true, ...} (or {"error": ...}), then one
reply per {"cmd": ...} until {"cmd": "quit"} or EOF. The parent asks one contender at a time, so exactly one
computes at any moment while the others block on their stdin."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("jax", "torch")  # a contender's worker imports exactly one of them


def time_calls(fn, reps: int, warmup: int = 1, sync=None) -> list:
    """Wall seconds of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones, each call waited for with
    ``sync(result)`` (default ``jax.block_until_ready``, through which torch results pass; a torch-only process
    passes its own ``sync``, e.g. ``lambda r: r`` for CPU tensors, and never imports jax)."""
    if sync is None:
        import jax
        sync = jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return ts


def add_worker_args(ap, timeout: float, results: str) -> None:
    """The options every comparative benchmark has: --timeout, --write (``results``: the files it writes) and the
    hidden --worker a worker process is started with."""
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds a worker may take for one command")
    ap.add_argument("--write", action="store_true", help=f"write {results}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def command_and_date(module: str, argv=None) -> tuple:
    """The command line a result file names (``python -m module args``) and the UTC date of the run."""
    cmd = f"python -m {module}" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return cmd, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_note(load_before: list) -> str:
    """What a result file says of the load before the run (on a quiet machine the benchmark's own threads raise
    the load while it runs, which is not noise from another job)."""
    if load_before[0] > 0.75 * (os.cpu_count() or 1):
        return " (busy before the run: another job was running, so timings are noisy)"
    return " (quiet before the run; the benchmark's own threads raise the load while it runs)"


def loadavg() -> list:
    """deepseek_jax.provenance.loadavg, which a parent cannot import (provenance imports jax)."""
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------------
def serve(setup) -> int:
    """Run a worker: ``setup()`` builds the contender and returns (info, handlers), handlers mapping a command name
    to a function of the message that returns the reply. Replies go to the original stdout; anything a library
    prints goes to stderr, never into the protocol. An exception becomes an {"error": ...} reply."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj):
        proto.write(json.dumps(obj, default=str) + "\n")
        proto.flush()

    try:
        info, handlers = setup()
    except Exception as e:  # reported to the parent, which names the contender
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    reply({"ready": True, **info, "imported": {m: m in sys.modules for m in FRAMEWORKS}})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "quit":
            break
        try:
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd!r}")
            reply(handlers[cmd](msg))
        except Exception as e:
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"})
    return 0


def provenance_setup(spec: dict):
    """The setup of a "provenance" worker, which the parent starts after the timing: the machine record (the load
    averages the parent measured, spec["load_before"] / ["load_after"]), the git revision, and a "write" command
    that writes the result files (deepseek_jax.provenance imports jax, so none of this can run in the parent)."""
    from deepseek_jax.provenance import git_rev, machine, machine_lines, write_result_files
    rec = machine(spec["load_before"], spec["load_after"], **spec.get("extra", {}))
    info = {"machine": rec, "machine_lines": machine_lines(rec, note=spec.get("note")), "git": git_rev()}
    return info, {"write": lambda msg: (write_result_files(msg["stem"], msg["data"], msg["md"], indent=2),
                                        {"ok": True})[1]}


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """One contender's process (``python -m module --worker=<spec>``); its stdout lines are queued by a thread, its
    stderr passes through (prefixed with the contender's name) and its last lines are kept for the error message
    if it dies."""

    def __init__(self, name: str, module: str, spec: dict, echo: bool = True):
        self.name = name
        self.tail = collections.deque(maxlen=8)
        self.lines = queue.Queue()
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--worker=" + json.dumps(spec)],
                                     cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, args=(echo,), daemon=True).start()

    def _pump_out(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
            else:
                self.tail.append(line.rstrip())
        self.lines.put(None)

    def _pump_err(self, echo):
        for line in self.proc.stderr:
            self.tail.append(line.rstrip())
            if echo:
                sys.stderr.write(f"  [{self.name}] {line}")
        self.proc.stderr.close()

    def _fail(self, what: str):
        rc = self.proc.poll()
        state = f"died (exit {rc})" if rc is not None else "is still running"
        last = " | ".join(t for t in self.tail if t.strip())[-1500:]
        raise WorkerError(f"worker {self.name!r} {state} during {what}; last stderr: {last or '(none)'}")

    def read(self, what: str, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(f"worker {self.name!r}: no reply to {what} within {timeout:.0f} s") from None
        if line is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._fail(what)
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"worker {self.name!r} failed during {what}: {msg['error']}")
        return msg

    def ask(self, cmd: str, timeout: float, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail(cmd)
        return self.read(cmd, timeout)

    def close(self, timeout: float = 30):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, module: str, spec: dict, timeout: float, pool: list, echo: bool = True,
          framework: str | None = None):
    """Start a worker and wait for its ready reply; the worker goes into ``pool`` first, so the caller's finally
    closes it whatever happens next. With ``framework`` (one of FRAMEWORKS), the contender must have imported it
    and none of the others."""
    w = Worker(name, module, spec, echo)
    pool.append(w)
    info = w.read("start (build, compile, warmup)", timeout)
    bad = [m for m, on in info["imported"].items() if framework and on != (m == framework)]
    if bad:
        raise WorkerError(f"worker {name!r} imported {bad} (each contender must run its framework alone)")
    return w, info
