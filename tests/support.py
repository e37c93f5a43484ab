"""Shared helpers for the pxeserver tests.

Real-peer tests (TFTP clients, DHCP clients, QEMU firmware) call
require_tool() first.  Two environment variables steer them:

- PXESERVER_REQUIRE_PEERS=1 turns a missing tool into a test failure
  instead of a skip, so CI cannot pass by skipping every real client.
- PXESERVER_UNIT_ONLY=1 skips every real-peer test, even when peers are
  required.  CI sets it for the run on the oldest supported Python,
  because the real peers are proved once on the main interpreter.

PXEServerProcess runs pxeserver.py as a child process, optionally inside a
network namespace, and lets a test wait for its log lines.  Every wait in
the tests is bounded by WAIT_SECONDS.
"""

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PXESERVER_PATH = os.path.join(REPO_ROOT, "pxeserver.py")

# Upper bound on any single wait in the tests: server start-up, one client
# run, one log line, process exit.  It is generous because CI runs on two
# vCPUs, and a passing test waits far less.
WAIT_SECONDS = 60

REQUIRE_PEERS = os.environ.get("PXESERVER_REQUIRE_PEERS") == "1"
UNIT_ONLY = os.environ.get("PXESERVER_UNIT_ONLY") == "1"

# Debian 12 package for each program a real-peer test may need, and for
# each directory of firmware and boot loader files, so that a skip message
# names the package to install.
TOOL_PACKAGES = {
    "atftp": "atftp",
    "busybox": "busybox",
    "curl": "curl",
    "dhclient": "isc-dhcp-client",
    "dnsmasq": "dnsmasq-base",
    "in.tftpd": "tftpd-hpa",
    "ip": "iproute2",
    "nft": "nftables",
    "perfdhcp": "kea-admin",
    "qemu-system-x86_64": "qemu-system-x86",
    "tcpdump": "tcpdump",
    "tftp": "tftp-hpa",
    "wget": "wget",
    "qemu-system-aarch64": "qemu-system-arm",
    "grub-mkimage": "grub-common",
}
FILE_PACKAGES = (
    ("/usr/lib/ipxe/qemu/", "ipxe-qemu"),
    ("/usr/lib/ipxe/", "ipxe"),
    ("/usr/lib/PXELINUX/", "pxelinux"),
    ("/usr/lib/SYSLINUX.EFI/", "syslinux-efi"),
    ("/usr/lib/syslinux/modules/", "syslinux-common"),
    ("/usr/share/OVMF/", "ovmf"),
    ("/usr/share/seabios/", "seabios"),
    ("/usr/share/AAVMF/", "qemu-efi-aarch64"),
    ("/usr/lib/u-boot/", "u-boot-qemu"),
    ("/usr/lib/grub/arm64-efi/", "grub-efi-arm64-bin:arm64"),
)

_READY_TEXT = "ready: mode="
_TFTP_ENDPOINT = re.compile(r"\btftp=(\S+):(\d+)")


def _package_for(name):
    for directory, package in FILE_PACKAGES:
        if name.startswith(directory):
            return package
    return TOOL_PACKAGES.get(name, "unknown")


def _is_available(name):
    if name.startswith("/"):
        return os.path.exists(name)
    return shutil.which(name) is not None


def _skip_or_fail(testcase, reason):
    if REQUIRE_PEERS:
        reason = f"{reason} (PXESERVER_REQUIRE_PEERS=1 forbids skipping)"
        if testcase is None:
            raise AssertionError(reason)
        testcase.fail(reason)
    if testcase is None:
        raise unittest.SkipTest(reason)
    testcase.skipTest(reason)


def _skip_if_unit_only(testcase):
    if UNIT_ONLY:
        reason = "real-peer test skipped because PXESERVER_UNIT_ONLY=1"
        if testcase is None:
            raise unittest.SkipTest(reason)
        testcase.skipTest(reason)


def require_tool(testcase, *names):
    """Skip or fail the test unless every named tool or file exists.

    A name is a program looked up on PATH, or an absolute file path such as
    a firmware image.  Pass the TestCase from a test method or setUp, or
    None from setUpClass (the skip or failure is then raised directly).
    PXESERVER_UNIT_ONLY=1 skips before any check.
    """
    _skip_if_unit_only(testcase)
    missing = [name for name in names if not _is_available(name)]
    if not missing:
        return
    hints = ", ".join(
        f"{name} (Debian package {_package_for(name)})"
        for name in missing
    )
    _skip_or_fail(testcase, f"missing {hints}")


def require_root(testcase):
    """Skip or fail the test unless it runs as root, as namespaces need."""
    _skip_if_unit_only(testcase)
    if os.geteuid() != 0:
        _skip_or_fail(testcase, "needs root for network namespaces")


def sha256_file(path):
    """Return the SHA-256 hex digest of the file at path."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_random_file(path, size, seed=0):
    """Write size pseudo-random bytes to path and return the path.

    The same seed gives the same bytes on every run, so a failure can be
    reproduced byte for byte.
    """
    rng = random.Random(seed)
    chunk_size = 1 << 20
    with open(path, "wb") as stream:
        remaining = size
        while remaining > 0:
            count = min(chunk_size, remaining)
            # getrandbits(0) raises ValueError before Python 3.9, so the
            # loop never requests zero bytes.
            stream.write(rng.getrandbits(8 * count).to_bytes(count, "little"))
            remaining -= count
    return path


def run_command(args, timeout=WAIT_SECONDS, **kwargs):
    """Run a client command with a bounded wait and capture its output.

    Returns a subprocess.CompletedProcess with text stdout and stderr.
    Raises subprocess.TimeoutExpired (after killing the command) when it
    runs longer than timeout seconds.
    """
    return subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        errors="replace",
        timeout=timeout,
        **kwargs,
    )


class PXEServerProcess:
    """pxeserver.py running as a child process, with its log collected.

    args are the pxeserver.py arguments.  prefix is a command that execs
    the interpreter, such as ["ip", "netns", "exec", "NS"].  A reader thread
    collects stdout and stderr lines into memory, and also appends them to
    log_path when one is given.  start() waits for the ready line and sets
    tftp_address and tftp_port from its tftp=ADDR:PORT field.

    stop() is idempotent, so it can be passed to addCleanup and also called
    by the test that wants the exit status.  Methods are meant for the
    test's own thread; only the reader thread runs concurrently.
    """

    def __init__(self, args, prefix=(), log_path=None, env=None):
        self.args = [str(arg) for arg in args]
        self.prefix = [str(arg) for arg in prefix]
        self.log_path = log_path
        self.env = env
        self.process = None
        self.returncode = None
        self.ready_line = None
        self.tftp_address = None
        self.tftp_port = None
        self._lines = []
        self._condition = threading.Condition()
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def command(self):
        """The full argument list that start() runs."""
        interpreter = [sys.executable, "-u", PXESERVER_PATH]
        return self.prefix + interpreter + self.args

    def start(self, wait_ready=True):
        """Start the server and, by default, wait for its ready line.

        Raises AssertionError, after stopping the process, when the server
        exits or stays silent for WAIT_SECONDS before logging ready.
        """
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=self.env,
        )
        self._reader = threading.Thread(
            target=self._read_output,
            name=f"pxeserver-log-{self.process.pid}",
            daemon=True,
        )
        self._reader.start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=WAIT_SECONDS):
        """Wait for the ready line, then parse the TFTP address and port."""
        try:
            line = self.wait_for_log(_READY_TEXT, timeout)
        except AssertionError:
            exited = self.process.poll() is not None
            self.stop()
            if exited:
                problem = f"exited with status {self.returncode} before"
            else:
                problem = f"was stopped after {timeout} s without"
            raise AssertionError(
                f"pxeserver {problem} logging {_READY_TEXT!r}; "
                f"command: {self.command}\nlog:\n{self.log_text()}"
            ) from None
        self.ready_line = line
        match = _TFTP_ENDPOINT.search(line)
        if match is not None:
            self.tftp_address = match.group(1)
            self.tftp_port = int(match.group(2))
        return line

    def log_text(self):
        """Return everything the server has written so far."""
        with self._condition:
            return "".join(self._lines)

    def log_mark(self):
        """Return a position in the log for wait_for_log(since=...)."""
        with self._condition:
            return len(self._lines)

    def wait_for_log(self, text, timeout=WAIT_SECONDS, since=0):
        """Return the first log line after position since containing text.

        Raises AssertionError, with the log, when no such line arrives
        within timeout seconds or the server's output ends first.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                # Read the reader's state before scanning, so lines it
                # appended just before ending are still scanned.
                reader_done = not self._reader.is_alive()
                for line in self._lines[since:]:
                    if text in line:
                        return line.rstrip("\n")
                since = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or reader_done:
                    break
                self._condition.wait(remaining)
            log = "".join(self._lines)
        ending = "server output ended" if reader_done else "timed out"
        raise AssertionError(
            f"{ending} waiting {timeout} s for a log line containing "
            f"{text!r}; log:\n{log}"
        )

    def wait_for_exit(self, timeout=WAIT_SECONDS):
        """Wait for the server to exit by itself and return its status.

        Raises AssertionError, after killing it, when it is still running
        after timeout seconds.
        """
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"pxeserver still running after {timeout} s; "
                f"log:\n{self.log_text()}"
            ) from None
        self._join_reader()
        return self.returncode

    def stop(self, timeout=WAIT_SECONDS):
        """Send SIGTERM, SIGKILL after timeout seconds, return exit status.

        A status from SIGKILL is negative, as in subprocess.  Calling stop()
        on a server that already exited only returns its status.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.returncode = self.process.returncode
        self._join_reader()
        return self.returncode

    def _join_reader(self):
        self._reader.join(WAIT_SECONDS)
        self.process.stdout.close()

    def _read_output(self):
        log_file = None
        if self.log_path is not None:
            log_file = open(self.log_path, "a", encoding="utf-8")
        try:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                if log_file is not None:
                    log_file.write(line)
                    log_file.flush()
                with self._condition:
                    self._lines.append(line)
                    self._condition.notify_all()
        finally:
            if log_file is not None:
                log_file.close()
            with self._condition:
                self._condition.notify_all()
