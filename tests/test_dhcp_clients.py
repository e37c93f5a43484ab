"""Real DHCP clients against pxeserver.py inside network namespaces.

Each test builds a lab (tests/netns.py): pxeserver.py runs in the server
namespace on a veth end with 192.0.2.1/24, and one client runs in a
namespace of its own, on a veth end joined to the lab's bridge.  The
clients are ISC dhclient and busybox udhcpc.  Both run a hook script that
the test writes, never their default scripts, because those rewrite
/etc/resolv.conf, which network namespaces share with the host.

The hook script stores the environment of every client event (BOUND,
REBOOT, bound, renew, ...) in a numbered file.  It also puts the leased
address on the client's interface, because the clients send renewals and
releases by unicast from that address.

A missing client program skips its tests, or fails them when
PXESERVER_REQUIRE_PEERS=1.
"""

import ipaddress
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import unittest

import netns
import support
from support import WAIT_SECONDS


SERVER_ADDRESS = netns.SERVER_ADDRESS
SUBNET_MASK = "255.255.255.0"
POOL_START = "192.0.2.100"
POOL_END = "192.0.2.120"

# An address in the pool but not its first one: a server that forgot its
# leases would offer POOL_START to the returning client instead.
PERSISTED_ADDRESS = "192.0.2.110"

# The reserved address of the known client, outside the pool.
RESERVED_ADDRESS = "192.0.2.50"
KNOWN_MAC = "02:00:00:00:aa:01"

# udhcpc sends option 93 (client architecture) = 7, x86-64 UEFI, so the
# server replies with its --efi64-file.
EFI64_FILE = "test-x64.efi"
UDHCPC_ARCH_OPTION = "0x5d:0007"

# dhclient gives up after this many seconds without a lease, well within
# the WAIT_SECONDS bound on the whole client run.
DHCLIENT_TIMEOUT_SECONDS = WAIT_SECONDS // 3

# udhcpc sends this many DISCOVERs, this many seconds apart, then gives up
# (with -n).  A client that must get no reply sends fewer, to save time.
UDHCPC_DISCOVER_COUNT = 3
UDHCPC_DISCOVER_SECONDS = 2
UNANSWERED_DISCOVER_COUNT = 2
UNANSWERED_DISCOVER_SECONDS = 1

POLL_SECONDS = 0.05
LOG_TAIL_LINES = 30

# Shared by both clients: dhclient passes the event in $reason, udhcpc in
# $1.  The environment is written to a temporary name and renamed, so the
# test never reads a half-written file.
HOOK_SCRIPT = """\
#!/bin/sh
event="${{reason:-$1}}"
events={events}
count=$(ls "$events" | wc -l)
env > "$events/.partial.$$"
mv "$events/.partial.$$" "$events/$(printf %03d "$count")-$event"
case "$event" in
BOUND|RENEW|REBIND|REBOOT)
    ip address replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    ;;
bound|renew)
    ip address replace "$ip/$mask" dev "$interface"
    ;;
RELEASE|EXPIRE|FAIL|STOP|deconfig)
    ip address flush dev "$interface"
    ;;
esac
exit 0
"""


def random_mac():
    """Return a random locally administered unicast MAC address."""
    return "02:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(5))


def read_environment(path):
    """Parse the output of env(1) into a dict."""
    values = {}
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            name, separator, value = line.rstrip("\n").partition("=")
            if separator:
                values[name] = value
    return values


def in_pool(text):
    """Tell whether text is an IPv4 address inside the server's pool."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    start = ipaddress.IPv4Address(POOL_START)
    end = ipaddress.IPv4Address(POOL_END)
    return start <= address <= end


class _DHCPClientTestCase(unittest.TestCase):
    """A lab with one client namespace, and helpers to run clients in it.

    Subclasses set tool_names to the client programs they run.  setUp
    gives the client interface the random MAC address self.mac; the server
    is started by each test, because some tests need a config file.
    """

    tool_names = ()

    def setUp(self):
        support.require_root(self)
        support.require_tool(self, "ip", *self.tool_names)
        reason = netns.check_lab_support()
        if reason is not None:
            if support.REQUIRE_PEERS:
                self.fail(f"{reason} (PXESERVER_REQUIRE_PEERS=1)")
            self.skipTest(reason)

        self.workdir = tempfile.mkdtemp(prefix="pxeserver-dhcp-clients-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)
        with open(os.path.join(self.root, EFI64_FILE), "wb") as stream:
            stream.write(b"not a real boot file\n")
        self.lease_file = os.path.join(self.workdir, "leases.json")
        self.events_dir = os.path.join(self.workdir, "events")
        os.mkdir(self.events_dir)
        self.script = os.path.join(self.workdir, "hook.sh")
        with open(self.script, "w", encoding="utf-8") as stream:
            stream.write(HOOK_SCRIPT.format(events=self.events_dir))
        os.chmod(self.script, stat.S_IRWXU)

        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.client_ns = self.lab.add_namespace("c0")
        self.iface = self.lab.add_veth(self.client_ns)
        self.wait_for_bridge_forwarding()
        self.server = None
        self.mac = random_mac()
        self.set_mac(self.mac)

    # --- server

    def start_server(self, *extra_args):
        """Start pxeserver.py in the server namespace and wait for ready."""
        args = [
            "--iface", self.lab.server_iface, "--root", self.root,
            "--lease-file", self.lease_file,
            "--pool-start", POOL_START, "--pool-end", POOL_END,
            "--efi64-file", EFI64_FILE, *extra_args,
        ]
        prefix = self.lab.exec_prefix(self.lab.server_ns)
        self.server = support.PXEServerProcess(args, prefix=prefix)
        self.addCleanup(self.server.stop)
        self.server.start()
        return self.server

    def log_tail(self):
        """Return the last lines of the server's log, for failure texts."""
        if self.server is None:
            return "pxeserver log: (server not started)"
        lines = self.server.log_text().splitlines()[-LOG_TAIL_LINES:]
        return "pxeserver log tail:\n" + "\n".join(lines)

    def server_log_since(self, mark):
        """Return the server's log lines written after position mark."""
        return self.server.log_text().splitlines()[mark:]

    # --- client namespace

    def wait_for_bridge_forwarding(self):
        """Wait until every port of the lab's bridge forwards frames.

        A new veth port stays "disabled" for up to a second, until the
        kernel's link watch handles its carrier, and drops frames until
        then: the client's first DISCOVER would be lost and the test would
        wait for its retransmission.
        """
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            result = self.lab.run(
                self.lab.client_ns, ["bridge", "-json", "link", "show"],
                universal_newlines=True,
            )
            ports = json.loads(result.stdout or "[]")
            states = {port["ifname"]: port.get("state") for port in ports}
            if states and set(states.values()) == {"forwarding"}:
                return
            if time.monotonic() > deadline:
                self.fail(f"bridge ports not forwarding after "
                          f"{WAIT_SECONDS} s: {states}")
            time.sleep(POLL_SECONDS)

    def set_mac(self, mac):
        result = self.lab.run(
            self.client_ns,
            ["ip", "link", "set", "dev", self.iface, "address", mac],
        )
        self.assertEqual(
            result.returncode, 0,
            f"cannot set MAC {mac} on {self.iface}: {result.stderr!r}",
        )

    def run_client(self, argv):
        """Run a client in the client namespace to its exit, bounded.

        Returns the CompletedProcess with text output.  A client still
        running after WAIT_SECONDS fails the test with the server's log.
        """
        try:
            return self.lab.run(
                self.client_ns, argv, timeout=WAIT_SECONDS,
                universal_newlines=True, errors="replace",
            )
        except subprocess.TimeoutExpired:
            self.fail(
                f"{argv[0]} still running after {WAIT_SECONDS} s: "
                f"{argv}\n{self.log_tail()}"
            )

    def udhcpc_argv(self, *extra_args, discovers=UDHCPC_DISCOVER_COUNT,
                    interval=UDHCPC_DISCOVER_SECONDS):
        """Return a udhcpc command line that gives up (-n) after discovers.

        interval is the wait for an offer after each DISCOVER, in seconds.
        """
        return [
            "busybox", "udhcpc", "-f", "-n", "-i", self.iface,
            "-s", self.script, "-t", str(discovers), "-T", str(interval),
            *extra_args,
        ]

    def run_udhcpc_once(self, *extra_args):
        """Run udhcpc with -q, which exits once bound; return the output."""
        result = self.run_client(self.udhcpc_argv("-q", *extra_args))
        self.assertEqual(
            result.returncode, 0,
            f"udhcpc exited with status {result.returncode}:\n"
            f"{result.stderr}\n{self.log_tail()}",
        )
        return result

    def event_count(self):
        return len(self.event_names())

    def event_names(self):
        return sorted(
            name for name in os.listdir(self.events_dir)
            if not name.startswith(".")
        )

    def wait_for_event(self, events, since=0, context=""):
        """Return the environment of the first listed event after since.

        events is a tuple of event names; since counts the events to
        skip.  Fails the test, with context and the server's log, when
        none arrives within WAIT_SECONDS.
        """
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            for name in self.event_names()[since:]:
                event = name.partition("-")[2]
                if event in events:
                    return read_environment(
                        os.path.join(self.events_dir, name))
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        self.fail(
            f"no client event {events} within {WAIT_SECONDS} s; events "
            f"seen: {self.event_names()}\n{context}\n{self.log_tail()}"
        )

    def read_lease_entry(self):
        """Return the lease file's entry for self.mac, or None."""
        with open(self.lease_file, encoding="utf-8") as stream:
            document = json.load(stream)
        for entry in document["leases"]:
            if entry["mac"] == self.mac:
                return entry
        return None


class TestDhclient(_DHCPClientTestCase):
    """ISC dhclient: binding, INIT-REBOOT with a kept lease, release."""

    tool_names = ("dhclient",)

    def setUp(self):
        super().setUp()
        self.client_lease_file = os.path.join(self.workdir, "dhclient.leases")
        self.pid_file = os.path.join(self.workdir, "dhclient.pid")
        self.config_file = os.path.join(self.workdir, "dhclient.conf")
        with open(self.config_file, "w", encoding="utf-8") as stream:
            stream.write(f"timeout {DHCLIENT_TIMEOUT_SECONDS};\n")
        # Registered after the lab, so it runs before the lab is closed.
        self.addCleanup(self.stop_dhclient)

    def run_dhclient(self, *extra_args):
        """Run dhclient once (-1); it forks into the background when bound.

        The parent returns after the hook script has run for the event.
        """
        argv = [
            "dhclient", "-1", "-v", "-cf", self.config_file,
            "-sf", self.script, "-lf", self.client_lease_file,
            "-pf", self.pid_file, *extra_args, self.iface,
        ]
        result = self.run_client(argv)
        self.assertEqual(
            result.returncode, 0,
            f"dhclient {' '.join(extra_args)} exited with status "
            f"{result.returncode}:\n{result.stderr}\n{self.log_tail()}",
        )
        return result

    def stop_dhclient(self):
        """Stop the background dhclient with SIGTERM, which sends nothing.

        The PID comes from our own pid file, and is checked against
        /proc before the signal.
        """
        try:
            with open(self.pid_file) as stream:
                pid = int(stream.read().strip() or 0)
        except (OSError, ValueError):
            return
        if pid <= 0 or not self._is_our_dhclient(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT_SECONDS
        while self._is_our_dhclient(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(POLL_SECONDS)

    def _is_our_dhclient(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                command = stream.read()
        except OSError:
            return False
        return self.pid_file.encode() in command

    def bind(self):
        """Start the server, run dhclient until BOUND.

        Returns the BOUND event's environment and dhclient's output.
        """
        self.start_server()
        result = self.run_dhclient()
        environment = self.wait_for_event(("BOUND",), context=result.stderr)
        return environment, result.stderr

    def test_dhclient_binds_address_in_pool(self):
        environment, output = self.bind()
        address = environment.get("new_ip_address")
        context = f"{output}\n{self.log_tail()}"

        self.assertTrue(
            in_pool(address),
            f"bound address {address!r} outside {POOL_START}-{POOL_END}\n"
            f"{context}",
        )
        self.assertEqual(environment.get("new_subnet_mask"), SUBNET_MASK,
                         context)
        self.assertEqual(
            environment.get("new_dhcp_server_identifier"), SERVER_ADDRESS,
            context,
        )
        self.server.wait_for_log(f"DHCPACK to {self.mac} yiaddr={address}")

    def test_dhclient_finds_no_malformed_option(self):
        # dhclient prints "OPTION: N extra bytes" for an option longer than
        # its type, as happens when a reply carries the same option twice
        # and RFC 3396 concatenation doubles it.
        environment, output = self.bind()
        address = environment.get("new_ip_address")

        self.assertNotIn(
            "extra bytes", output,
            f"dhclient found malformed options in the reply for "
            f"{address}:\n{output}\n{self.log_tail()}",
        )

    def test_dhclient_reboot_keeps_address(self):
        environment, _ = self.bind()
        address = environment.get("new_ip_address")
        self.stop_dhclient()
        mark = self.server.log_mark()
        since = self.event_count()

        # A new dhclient with the same lease file starts in INIT-REBOOT:
        # a DHCPREQUEST for the lease it has, with no DHCPDISCOVER.
        result = self.run_dhclient()
        rebooted = self.wait_for_event(("REBOOT", "BOUND"), since,
                                       result.stderr)
        context = f"{result.stderr}\n{self.log_tail()}"

        self.assertEqual(rebooted.get("reason"), "REBOOT", context)
        self.assertEqual(rebooted.get("new_ip_address"), address, context)
        request = self.server.wait_for_log(
            f"DHCPREQUEST from {self.mac}", since=mark)
        self.assertIn(f"requested={address}", request)
        self.server.wait_for_log(f"DHCPACK to {self.mac} yiaddr={address}",
                                 since=mark)
        discovers = [line for line in self.server_log_since(mark)
                     if f"DHCPDISCOVER from {self.mac}" in line]
        self.assertEqual(discovers, [], context)

    def test_dhclient_release_reaches_server(self):
        environment, _ = self.bind()
        address = environment.get("new_ip_address")
        mark = self.server.log_mark()
        since = self.event_count()

        result = self.run_dhclient("-r")
        self.wait_for_event(("RELEASE",), since, result.stderr)

        self.server.wait_for_log(f"released {address} from {self.mac}",
                                 since=mark)
        entry = self.read_lease_entry()
        self.assertIsNotNone(entry, self.log_tail())
        self.assertLessEqual(
            entry["expires"], time.time(),
            f"released lease still current in the lease file: {entry}",
        )


class TestUdhcpc(_DHCPClientTestCase):
    """busybox udhcpc: boot file and siaddr, renewal, release on exit."""

    tool_names = ("busybox",)

    def start_udhcpc(self, *extra_args):
        """Start udhcpc in the background; return (process, output path).

        The lab kills it on close if the test has not stopped it.
        """
        output_path = os.path.join(self.workdir, "udhcpc.out")
        with open(output_path, "w") as output:
            process = self.lab.popen(
                self.client_ns, self.udhcpc_argv(*extra_args),
                stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT,
            )
        return process, output_path

    def read_output(self, path):
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def test_udhcpc_gets_boot_file_and_siaddr(self):
        self.start_server()

        result = self.run_udhcpc_once(
            "-O", "bootfile", "-x", UDHCPC_ARCH_OPTION)
        environment = self.wait_for_event(("bound",), context=result.stderr)
        context = f"{result.stderr}\n{self.log_tail()}"

        self.assertTrue(in_pool(environment.get("ip")), context)
        self.assertEqual(environment.get("siaddr"), SERVER_ADDRESS, context)
        self.assertEqual(environment.get("boot_file"), EFI64_FILE, context)
        self.assertEqual(environment.get("bootfile"), EFI64_FILE, context)
        self.assertEqual(environment.get("serverid"), SERVER_ADDRESS,
                         context)

    def test_udhcpc_sees_subnet_option_once(self):
        # udhcpc joins repeated instances of an option with a space, so a
        # reply that carries option 1 twice shows up in $subnet.
        self.start_server()

        result = self.run_udhcpc_once()
        environment = self.wait_for_event(("bound",), context=result.stderr)

        self.assertEqual(environment.get("subnet"), SUBNET_MASK,
                         f"{result.stderr}\n{self.log_tail()}")

    def test_udhcpc_renew_keeps_address(self):
        self.start_server()
        process, output_path = self.start_udhcpc()
        bound = self.wait_for_event(("bound",))
        address = bound.get("ip")
        mark = self.server.log_mark()
        since = self.event_count()

        # SIGUSR1 makes udhcpc renew at once: a DHCPREQUEST sent by
        # unicast from its address, with that address in ciaddr.
        process.send_signal(signal.SIGUSR1)
        renewed = self.wait_for_event(("renew", "bound"), since,
                                      self.read_output(output_path))
        context = f"{self.read_output(output_path)}\n{self.log_tail()}"

        self.assertEqual(renewed.get("ip"), address, context)
        request = self.server.wait_for_log(
            f"DHCPREQUEST from {self.mac}", since=mark)
        self.assertIn(f"ciaddr={address}", request)
        self.server.wait_for_log(f"DHCPACK to {self.mac} yiaddr={address}",
                                 since=mark)

    def test_udhcpc_release_on_exit(self):
        # busybox 1.35 sends no release when -q ends it, so the test stops
        # a long-running udhcpc with SIGTERM instead.
        self.start_server()
        process, output_path = self.start_udhcpc("-R")
        bound = self.wait_for_event(("bound",))
        address = bound.get("ip")
        mark = self.server.log_mark()

        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.fail(f"udhcpc still running {WAIT_SECONDS} s after "
                      f"SIGTERM\n{self.read_output(output_path)}")

        self.assertEqual(status, 0, self.read_output(output_path))
        self.server.wait_for_log(f"released {address} from {self.mac}",
                                 since=mark)


class TestLeasePersistence(_DHCPClientTestCase):
    """Leases written to the lease file outlive a server restart."""

    tool_names = ("busybox",)

    def run_udhcpc(self, *extra_args):
        """Run udhcpc once and return the environment of its bound event."""
        since = self.event_count()
        result = self.run_udhcpc_once(*extra_args)
        return self.wait_for_event(("bound",), since, result.stderr)

    def test_lease_survives_server_restart(self):
        self.start_server()
        first = self.run_udhcpc("-r", PERSISTED_ADDRESS)
        self.assertEqual(first.get("ip"), PERSISTED_ADDRESS,
                         f"udhcpc did not get the address it requested\n"
                         f"{self.log_tail()}")

        status = self.server.stop()
        self.assertEqual(status, 0, f"exit status after SIGTERM\n"
                                    f"{self.log_tail()}")
        entry = self.read_lease_entry()
        self.assertIsNotNone(entry, f"no lease for {self.mac} in "
                                    f"{self.lease_file}")
        self.assertEqual(entry["address"], PERSISTED_ADDRESS)
        self.assertGreater(entry["expires"], time.time())

        # Without -r, udhcpc requests no address, so the offer must come
        # from the lease the new server read from the file.
        self.start_server()
        second = self.run_udhcpc()

        self.assertEqual(second.get("ip"), PERSISTED_ADDRESS,
                         self.log_tail())


class TestKnownClientsOnly(_DHCPClientTestCase):
    """known_clients_only: only MACs with a [host:MAC] section get leases."""

    tool_names = ("busybox",)

    def setUp(self):
        super().setUp()
        self.config_file = os.path.join(self.workdir, "pxe.ini")
        with open(self.config_file, "w", encoding="utf-8") as stream:
            stream.write(
                "[dhcp]\n"
                "known_clients_only = yes\n"
                "\n"
                f"[host:{KNOWN_MAC}]\n"
                f"address = {RESERVED_ADDRESS}\n"
            )

    def test_unknown_client_gets_no_lease(self):
        self.start_server("--config", self.config_file)

        result = self.run_client(self.udhcpc_argv(
            "-q", discovers=UNANSWERED_DISCOVER_COUNT,
            interval=UNANSWERED_DISCOVER_SECONDS))
        context = f"{result.stderr}\n{self.log_tail()}"

        self.assertNotEqual(result.returncode, 0, context)
        bound = [name for name in self.event_names()
                 if name.endswith("-bound")]
        self.assertEqual(bound, [], context)
        self.server.wait_for_log(
            f"DHCPDISCOVER from {self.mac} ignored: not a known client")
        offers = [line for line in self.server_log_since(0)
                  if f"DHCPOFFER to {self.mac}" in line]
        self.assertEqual(offers, [], context)

    def test_known_client_gets_reserved_address(self):
        self.mac = KNOWN_MAC
        self.set_mac(KNOWN_MAC)
        self.start_server("--config", self.config_file)

        result = self.run_client(self.udhcpc_argv("-q"))
        context = f"{result.stderr}\n{self.log_tail()}"

        self.assertEqual(result.returncode, 0, context)
        environment = self.wait_for_event(("bound",), context=context)
        self.assertEqual(environment.get("ip"), RESERVED_ADDRESS, context)


if __name__ == "__main__":
    unittest.main()
