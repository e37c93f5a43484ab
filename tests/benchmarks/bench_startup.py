#!/usr/bin/env python3
"""Time pxeserver.py from exec to its ready line.

Each case runs RUNS times and prints its median; the server cases also
print the ratio of the median to the goal:

- bare: `python3 -c "print()"`, exec to the printed line, the
  interpreter's own start-up;
- import: `python3 -c "import pxeserver; print()"`, exec to the printed
  line, the floor that every start-up pays;
- compile: compiling pxeserver.py in this process, which a script run
  pays on every start and an import with a bytecode cache does not;
- tftp-only: `--tftp-only` on 127.0.0.1 with port 0, exec to the
  `ready:` log line;
- full: `--mode full` (no auto-mode probe) on a veth end with
  192.0.2.1/24 inside a network namespace that this script creates,
  exec to the `ready:` log line.  The child enters the namespace with
  setns(2) between fork and exec, so `ip netns exec` adds no time.

Needs root and `ip` for the full case; `--skip-full` leaves it out.  The
namespace is deleted on exit, also after a failure.  Every wait is bounded
by WAIT_SECONDS.
"""

import argparse
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
PXESERVER_PATH = os.path.join(REPO_ROOT, "pxeserver.py")

RUNS = 20
GOAL_SECONDS = 0.150
WAIT_SECONDS = 30
READY_TEXT = "ready: mode="
CLONE_NEWNET = 0x40000000
SERVER_CIDR = "192.0.2.1/24"


def _run_ip(*args):
    subprocess.run(["ip", *args], check=True, timeout=WAIT_SECONDS,
                   stdout=subprocess.DEVNULL)


def _setns_hook(namespace):
    """Return a preexec_fn that moves the child into the namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = f"/var/run/netns/{namespace}"

    def enter():
        fd = os.open(path, os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(127)
        os.close(fd)
    return enter


def time_line(code):
    """Return the seconds from Popen to the first line `-c code` prints.

    Measured like time_ready, to a line and not to the exit, so that
    interpreter shutdown is left out of both.
    """
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT,
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE)
    with process.stdout:
        signal.alarm(WAIT_SECONDS)
        process.stdout.readline()
        signal.alarm(0)
    elapsed = time.monotonic() - started
    process.wait(WAIT_SECONDS)
    return elapsed


def time_compile():
    """Return the seconds compiling pxeserver.py takes in this process.

    A script run as `python3 pxeserver.py` is compiled on every start,
    because CPython caches bytecode only for imported modules.
    """
    with open(PXESERVER_PATH, encoding="utf-8") as stream:
        source = stream.read()
    started = time.monotonic()
    compile(source, PXESERVER_PATH, "exec")
    return time.monotonic() - started


def time_ready(args, preexec_fn=None):
    """Return the seconds from Popen to the server's ready line."""
    command = [sys.executable, "-u", PXESERVER_PATH, *args]
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE,
                               preexec_fn=preexec_fn)
    try:
        deadline = started + WAIT_SECONDS
        elapsed = None
        # readline blocks, so the deadline is checked only between lines,
        # and the alarm bounds a server that stays silent.
        signal.alarm(WAIT_SECONDS)
        for raw in iter(process.stderr.readline, b""):
            if READY_TEXT.encode() in raw:
                elapsed = time.monotonic() - started
                break
            if time.monotonic() > deadline:
                break
        signal.alarm(0)
        if elapsed is None:
            raise RuntimeError(f"no ready line from {command}")
        return elapsed
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT_SECONDS)
        process.stderr.close()


def _on_alarm(signum, frame):
    raise TimeoutError(f"no ready line within {WAIT_SECONDS} s")


def report(name, samples, goal):
    median = statistics.median(samples)
    line = (f"{name:10s} median {median * 1000:6.1f} ms  "
            f"min {min(samples) * 1000:6.1f} ms  "
            f"max {max(samples) * 1000:6.1f} ms")
    if goal is not None:
        line += f"  {median / goal:.2f}x of the {goal * 1000:.0f} ms goal"
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--skip-full", action="store_true",
                        help="leave out the full-mode case (needs root)")
    options = parser.parse_args()
    signal.signal(signal.SIGALRM, _on_alarm)
    print(f"{sys.executable} {sys.version.split()[0]}, "
          f"{options.runs} runs each", flush=True)
    with tempfile.TemporaryDirectory(prefix="pxestart-") as temp:
        root = os.path.join(temp, "root")
        os.mkdir(root)
        for name in ("undionly.kpxe", "ipxe.efi", "boot.ipxe"):
            with open(os.path.join(root, name), "wb") as stream:
                stream.write(b"x")
        runs = range(options.runs)
        report("bare", [time_line("print()") for _ in runs], None)
        report("import", [time_line("import pxeserver; print()")
                          for _ in runs], None)
        report("compile", [time_compile() for _ in runs], None)
        tftp_args = ["--tftp-only", "--tftp-address", "127.0.0.1",
                     "--tftp-port", "0", "--root", root]
        report("tftp-only",
               [time_ready(tftp_args) for _ in range(options.runs)],
               GOAL_SECONDS)
        if options.skip_full:
            return 0
        namespace = f"pxst{os.getpid()}"
        iface = f"pxst{os.getpid()}a"[:15]
        _run_ip("netns", "add", namespace)
        try:
            _run_ip("-n", namespace, "link", "add", iface, "type", "veth",
                    "peer", "name", f"{iface[:14]}b")
            _run_ip("-n", namespace, "address", "add", SERVER_CIDR, "dev",
                    iface)
            _run_ip("-n", namespace, "link", "set", iface, "up")
            full_args = ["--mode", "full", "--iface", iface, "--root",
                         root, "--lease-file",
                         os.path.join(temp, "leases.json")]
            hook = _setns_hook(namespace)
            report("full", [time_ready(full_args, hook)
                            for _ in range(options.runs)], GOAL_SECONDS)
        finally:
            subprocess.run(["ip", "netns", "delete", namespace],
                           timeout=WAIT_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
