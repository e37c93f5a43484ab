"""Network-namespace lab for tests that run real DHCP and PXE clients.

Layout (one lab per test; every name carries a per-run prefix)::

    server namespace                client namespace
    +----------------------+        +--------------------------------+
    | VETH 192.0.2.1/24 ---+--------+-- PEER --- bridge (STP off) ---+
    +----------------------+        |              |        |        |
                                    |            tap      veth end   |
                                    |         (QEMU)   (Linux client)|
                                    +--------------------------------+

The server namespace contains the server's end of a veth pair with the
documentation address 192.0.2.1/24 and MTU 1500. The client namespace
contains a bridge that joins the server's veth peer, the tap devices of
QEMU guests and the veth ends of Linux DHCP clients. The bridge runs
without STP and with a forward delay of 0, so frames pass from the first
packet on.

Nothing runs in the default namespace and no link is created there,
because each link is created directly inside its namespace. `Lab.close()`
kills the processes started through `popen()` by process group and deletes
the namespaces, which removes every link inside them, even after a failed
setup.
"""

import itertools
import os
import signal
import subprocess

import support


SERVER_ADDRESS = "192.0.2.1"
PREFIX_LENGTH = 24
LINK_MTU = 1500

# Bound on each `ip` command and on waiting for a killed process to exit.
COMMAND_TIMEOUT_SECONDS = 10

# Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
MAX_IFNAME_LENGTH = 15

_lab_numbers = itertools.count()


class LabError(Exception):
    """An `ip` command that builds or extends the lab failed."""


def check_lab_support():
    """Return why a lab cannot be built on this machine, or None.

    Creates and deletes one throwaway namespace, because a container may
    refuse `ip netns add` even to root.
    """
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"pxchk{os.getpid()}"
    try:
        result = subprocess.run(
            ["ip", "netns", "add", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace").strip()
        return f"'ip netns add' failed: {output}"
    subprocess.run(
        ["ip", "netns", "delete", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    return None


def require_lab(testcase):
    """Skip testcase, or fail it under PXESERVER_REQUIRE_PEERS=1, unless
    a lab can be built here."""
    support.require_root(testcase)
    reason = check_lab_support()
    if reason is None:
        return
    if support.REQUIRE_PEERS:
        testcase.fail(f"{reason} (PXESERVER_REQUIRE_PEERS=1 forbids "
                      f"skipping)")
    testcase.skipTest(reason)


class Lab:
    """A server namespace and a client namespace joined by a bridge.

    The constructor builds the lab and raises `LabError` (after
    removing what it created) when a command fails. Attributes:
    `server_ns` and `client_ns` are namespace names, `server_iface` is the
    server's veth end, `bridge` is the bridge in the client namespace.
    Not thread safe: use one lab from one thread.
    """

    def __init__(self):
        self.prefix = f"px{os.getpid():x}{next(_lab_numbers)}"
        self.server_ns = f"{self.prefix}-srv"
        self.client_ns = f"{self.prefix}-cli"
        self.server_iface = self._ifname("sv")
        self.bridge = self._ifname("br")
        self._peer_iface = self._ifname("sp")
        self._namespaces = []
        self._processes = []
        self._link_numbers = itertools.count()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _ifname(self, suffix):
        name = f"{self.prefix}{suffix}"
        if len(name) > MAX_IFNAME_LENGTH:
            raise ValueError(
                f"interface name {name!r} is longer than "
                f"{MAX_IFNAME_LENGTH} bytes"
            )
        return name

    def _ip(self, *args):
        """Run one `ip` command and raise LabError if it fails."""
        argv = ["ip", *args]
        result = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace").strip()
            raise LabError(
                f"{' '.join(argv)!r} failed with status "
                f"{result.returncode}: {output}"
            )

    def add_namespace(self, suffix):
        """Create namespace PREFIX-SUFFIX with loopback up and return its name.

        The lab deletes it in `close()`.
        """
        name = f"{self.prefix}-{suffix}"
        self._ip("netns", "add", name)
        self._namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")
        return name

    def _build(self):
        self.add_namespace("srv")
        self.add_namespace("cli")

        # The server's veth end, with its peer created straight in the
        # client namespace.
        self._ip(
            "-n", self.server_ns, "link", "add", self.server_iface,
            "mtu", str(LINK_MTU), "type", "veth",
            "peer", "name", self._peer_iface, "netns", self.client_ns,
        )
        self._ip(
            "-n", self.server_ns, "address", "add",
            f"{SERVER_ADDRESS}/{PREFIX_LENGTH}", "dev", self.server_iface,
        )
        self._ip("-n", self.server_ns, "link", "set", self.server_iface, "up")

        # STP off and forward delay 0: otherwise the bridge drops the
        # first seconds of frames on each new port.
        self._ip(
            "-n", self.client_ns, "link", "add", self.bridge,
            "type", "bridge", "stp_state", "0", "forward_delay", "0",
        )
        self._ip("-n", self.client_ns, "link", "set", self.bridge, "up")
        self._attach(self._peer_iface)

    def _attach(self, iface):
        self._ip(
            "-n", self.client_ns, "link", "set", iface,
            "mtu", str(LINK_MTU), "master", self.bridge, "up",
        )

    def add_tap(self):
        """Add a persistent tap device on the bridge and return its name.

        Run QEMU in `client_ns` with
        `-netdev tap,ifname=NAME,script=no,downscript=no`.
        """
        name = self._ifname(f"t{next(self._link_numbers)}")
        self._ip(
            "-n", self.client_ns, "tuntap", "add", "dev", name, "mode", "tap",
        )
        self._attach(name)
        return name

    def add_veth(self, namespace=None):
        """Add a veth pair with one end on the bridge and return the other.

        The free end, for a Linux DHCP client, stays in `client_ns` unless
        `namespace` names another namespace of this lab (see
        `add_namespace`), which gives the client its own routing table.
        The end is up and has no address.
        """
        number = next(self._link_numbers)
        name = self._ifname(f"c{number}")
        bridge_port = self._ifname(f"c{number}p")
        namespace = namespace or self.client_ns
        self._ip(
            "-n", self.client_ns, "link", "add", bridge_port,
            "type", "veth", "peer", "name", name, "netns", namespace,
        )
        self._attach(bridge_port)
        self._ip(
            "-n", namespace, "link", "set", name,
            "mtu", str(LINK_MTU), "up",
        )
        return name

    def exec_prefix(self, ns):
        """Return the command prefix that runs a program in namespace `ns`.

        `ip netns exec` replaces itself with the program, so a process
        started with this prefix has the program's PID.
        """
        return ["ip", "netns", "exec", ns]

    def run(self, ns, argv, timeout=COMMAND_TIMEOUT_SECONDS, **kwargs):
        """Run argv in namespace `ns` to completion, bounded by `timeout`.

        Takes the keyword arguments of `subprocess.run`, except that
        stdout and stderr default to pipes.
        """
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(
            self.exec_prefix(ns) + list(argv), timeout=timeout, **kwargs
        )

    def popen(self, ns, argv, **kwargs):
        """Start argv in namespace `ns` in a new session and return the Popen.

        Takes the keyword arguments of `subprocess.Popen`. `close()` kills
        the process group if its leader is still running.
        """
        process = subprocess.Popen(
            self.exec_prefix(ns) + list(argv), start_new_session=True,
            **kwargs
        )
        self._processes.append(process)
        return process

    def close(self):
        """Kill the lab's processes and delete its namespaces.

        Safe to call more than once and after a failed setup. Deleting a
        namespace destroys the veth, bridge and tap devices inside it.
        """
        while self._processes:
            _kill_process_group(self._processes.pop())
        while self._namespaces:
            subprocess.run(
                ["ip", "netns", "delete", self._namespaces.pop()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=COMMAND_TIMEOUT_SECONDS,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _kill_process_group(process):
    """Kill a process started by `Lab.popen`, and its group, then reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            # The group ended between poll() and killpg().
            pass
    try:
        process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # Stuck in the kernel despite SIGKILL. Go on with the cleanup, and
        # the namespace lives on until the process ends.
        pass
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
