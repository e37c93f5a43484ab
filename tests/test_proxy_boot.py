"""Proxy and auto mode beside another DHCP server, in network namespaces.

Each test builds a lab (tests/netns.py) and adds a third namespace whose
veth end on the lab's bridge has the address 192.0.2.2/24.  There dnsmasq
runs as a plain DHCP server: an address range, and no boot file, vendor
class or TFTP.  pxeserver.py runs in the server namespace (192.0.2.1), and
the clients run on the same bridge:

- auto mode probes the bridge at start-up and picks proxy mode when
  dnsmasq answers, full mode when nothing does;
- SeaBIOS with the iPXE ROM, and OVMF's own PXE client, boot in QEMU with
  their address from dnsmasq and their boot file from pxeserver, until a
  chained iPXE script prints a random token and reboots, which ends QEMU
  under -no-reboot;
- ISC dhclient, which is no PXE client, gets its lease from dnsmasq while
  pxeserver stays silent;
- full mode beside dnsmasq warns about the other server once a client's
  DHCPDISCOVER draws a broadcast offer from it.

A missing tool or firmware skips its test, or fails it when
PXESERVER_REQUIRE_PEERS=1.
"""

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import unittest

import netns
import support
import test_boot_qemu as qemu_boot
from support import WAIT_SECONDS


# Bound on one QEMU boot, from starting QEMU to its exit.
BOOT_TIMEOUT_SECONDS = qemu_boot.BOOT_TIMEOUT_SECONDS

OTHER_SERVER_ADDRESS = "192.0.2.2"
OTHER_SERVER_RANGE = ("192.0.2.50", "192.0.2.150")
# The pool of the full-mode test, apart from dnsmasq's range.
FULL_MODE_POOL = ("192.0.2.160", "192.0.2.200")

# The delay of a DHCP server's offer that auto mode must still wait for.
SLOW_SERVER_SECONDS = 4

# dnsmasq logs this line once its DHCP socket is bound.
DNSMASQ_READY_TEXT = "DHCP, IP range"

# udhcpc's DHCPDISCOVERs, and the seconds it waits for an offer after
# each, before it gives up.
UDHCPC_DISCOVER_COUNT = 3
UDHCPC_DISCOVER_SECONDS = 2

POLL_SECONDS = 0.05
LOG_TAIL_LINES = 40

# A hook script for dhclient and udhcpc that changes nothing: their
# default scripts rewrite /etc/resolv.conf, which namespaces share with
# the host.
NULL_HOOK_SCRIPT = "#!/bin/sh\nexit 0\n"


def random_mac(prefix="02"):
    """Return a random unicast MAC address that starts with prefix."""
    count = 6 - len(prefix.split(":"))
    return prefix + "".join(
        f":{byte:02x}" for byte in secrets.token_bytes(count))


class DnsmasqDHCPProcess(support.PXEServerProcess):
    """dnsmasq as a plain DHCP server; args are dnsmasq's arguments."""

    @property
    def command(self):
        return self.prefix + ["dnsmasq"] + self.args

    def wait_ready(self, timeout=WAIT_SECONDS):
        try:
            return self.wait_for_log(DNSMASQ_READY_TEXT, timeout)
        except AssertionError:
            self.stop()
            raise


class ProxyLabTestCase(unittest.TestCase):
    """A lab with a namespace for dnsmasq at 192.0.2.2 on its bridge.

    Each test starts dnsmasq and pxeserver itself, because the auto-mode
    test must run pxeserver without dnsmasq.
    """

    def setUp(self):
        support.require_tool(self, "ip", "dnsmasq")
        netns.require_lab(self)

        self.workdir = tempfile.mkdtemp(prefix="pxeserver-proxy-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)
        self.hook_script = os.path.join(self.workdir, "hook.sh")
        with open(self.hook_script, "w", encoding="utf-8") as stream:
            stream.write(NULL_HOOK_SCRIPT)
        os.chmod(self.hook_script, stat.S_IRWXU)

        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.dhcp_ns = self.lab.add_namespace("dhcp")
        self.dhcp_iface = self.lab.add_veth(self.dhcp_ns)
        self.run_checked(self.dhcp_ns, [
            "ip", "address", "add", f"{OTHER_SERVER_ADDRESS}/24",
            "dev", self.dhcp_iface])
        self.dnsmasq = None
        self.server = None

    # --- helpers

    def run_checked(self, namespace, argv):
        """Run a setup command in namespace and fail the test if it fails."""
        result = self.lab.run(namespace, argv, universal_newlines=True)
        self.assertEqual(result.returncode, 0,
                         f"{argv} failed: {result.stderr}")
        return result

    def start_dnsmasq(self, *extra_args):
        """Start dnsmasq in its namespace and wait until it serves DHCP."""
        args = [
            "--no-daemon", "--conf-file=/dev/null", "--port=0",
            f"--interface={self.dhcp_iface}",
            f"--dhcp-range={OTHER_SERVER_RANGE[0]},{OTHER_SERVER_RANGE[1]}",
            "--dhcp-authoritative", "--no-ping",
            f"--dhcp-leasefile={os.path.join(self.workdir, 'dnsmasq.leases')}",
            f"--pid-file={os.path.join(self.workdir, 'dnsmasq.pid')}",
            # Log to stderr, and stay root so the files above stay
            # writable in the private temporary directory.
            "--log-facility=-", "--user=root", "--group=root",
            *extra_args,
        ]
        self.dnsmasq = DnsmasqDHCPProcess(
            args, prefix=self.lab.exec_prefix(self.dhcp_ns))
        self.addCleanup(self.dnsmasq.stop)
        self.dnsmasq.start()
        return self.dnsmasq

    def start_pxeserver(self, *extra_args):
        """Start pxeserver.py in the server namespace; wait for ready."""
        args = [
            "--iface", self.lab.server_iface, "--root", self.root,
            "--lease-file", os.path.join(self.workdir, "leases.json"),
            *extra_args,
        ]
        self.server = support.PXEServerProcess(
            args, prefix=self.lab.exec_prefix(self.lab.server_ns))
        self.addCleanup(self.server.stop)
        self.server.start()
        return self.server

    def wait_for_bridge_forwarding(self):
        """Wait until every port of the lab's bridge forwards frames.

        A new veth port drops frames for up to a second, until the kernel
        notices its carrier.  pxeserver's one auto-mode probe would be
        lost in that time.
        """
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            result = self.lab.run(
                self.lab.client_ns, ["bridge", "-json", "link", "show"],
                universal_newlines=True)
            ports = json.loads(result.stdout or "[]")
            states = {port["ifname"]: port.get("state") for port in ports}
            if states and set(states.values()) == {"forwarding"}:
                return
            if time.monotonic() > deadline:
                self.fail(f"bridge ports not forwarding after "
                          f"{WAIT_SECONDS} s: {states}")
            time.sleep(POLL_SECONDS)

    def add_client_namespace(self, mac):
        """Add a client namespace with a veth end on the bridge.

        Returns (namespace, interface); the interface has address mac.
        """
        namespace = self.lab.add_namespace("c0")
        iface = self.lab.add_veth(namespace)
        self.run_checked(namespace, [
            "ip", "link", "set", "dev", iface, "address", mac])
        return namespace, iface

    def log_tails(self):
        """Return the last lines of both servers' logs."""
        parts = []
        for name, process in (("pxeserver", self.server),
                              ("dnsmasq", self.dnsmasq)):
            if process is None:
                continue
            lines = process.log_text().splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {name} log, last {LOG_TAIL_LINES} lines\n"
                         + "\n".join(lines))
        return "\n".join(parts)

    def server_lines(self, pattern):
        """Return pxeserver's log lines that match the regex pattern."""
        return [line for line in self.server.log_text().splitlines()
                if re.search(pattern, line)]


class TestAutoMode(ProxyLabTestCase):
    """--mode auto: one DHCPDISCOVER at start-up decides the mode."""

    def test_auto_chooses_proxy_beside_dnsmasq(self):
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()

        server = self.start_pxeserver("--mode", "auto")

        self.assertIn("mode=proxy", server.ready_line, self.log_tails())
        self.assertIn("boot-server=0.0.0.0:4011", server.ready_line)
        line = server.wait_for_log("choosing proxy")
        self.assertIn(f"DHCP server {OTHER_SERVER_ADDRESS} answered", line)

    def test_auto_probe_takes_no_lease(self):
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()

        self.start_pxeserver("--mode", "auto")
        # dnsmasq logs the offer it made to the probe; a DHCPREQUEST would
        # follow at once if pxeserver took the offer.
        self.dnsmasq.wait_for_log("DHCPOFFER")
        self.server.stop()

        requests = [line for line in self.dnsmasq.log_text().splitlines()
                    if "DHCPREQUEST" in line]
        self.assertEqual(requests, [], self.log_tails())

    def test_auto_chooses_proxy_beside_slow_server(self):
        # Clients send a DHCPDISCOVER again after 4 s, randomized by 1 s
        # (RFC 2131 section 4.1), and keep trying, so a server whose offer
        # takes 4 s still serves every client.  dnsmasq 2.90 without
        # --no-ping pings the address before its offer, and beside it auto
        # mode chose full mode in 3 of 4 runs on this test's lab.
        self.start_dnsmasq(f"--dhcp-reply-delay={SLOW_SERVER_SECONDS}")
        self.wait_for_bridge_forwarding()

        server = self.start_pxeserver("--mode", "auto")

        self.assertIn("mode=proxy", server.ready_line, self.log_tails())

    def test_auto_chooses_full_when_alone(self):
        self.wait_for_bridge_forwarding()

        server = self.start_pxeserver("--mode", "auto")

        self.assertIn("mode=full", server.ready_line, self.log_tails())
        server.wait_for_log("choosing full mode")


class TestProxyModeBoot(ProxyLabTestCase):
    """Real firmware boots with dnsmasq's address and pxeserver's files."""

    def setUp(self):
        super().setUp()
        support.require_tool(self, qemu_boot.QEMU)
        self.token = secrets.token_hex(8)
        self.token_line = f"boot-test-token {self.token}"
        self.mac = random_mac("52:54:00")

    def build_ipxe_scripts(self):
        """Write boot.ipxe, which chains a script that prints the token.

        Returns the chained script's name.  The line after the token is
        there because iPXE's serial output loses its last character when
        the script reboots at once.
        """
        chained = f"chain-{self.token}.ipxe"
        self.write_root_file("boot.ipxe", f"#!ipxe\nchain {chained}\n")
        self.write_root_file(
            chained,
            f"#!ipxe\necho {self.token_line}\necho rebooting\nreboot\n")
        return chained

    def write_root_file(self, name, text):
        with open(os.path.join(self.root, name), "w") as stream:
            stream.write(text)

    def start_servers(self):
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()
        self.start_pxeserver(
            "--mode", "proxy", "--bios-file", "undionly.kpxe",
            "--efi64-file", "ipxe.efi", "--ipxe-script", "boot.ipxe")

    def start_guest(self, firmware_args, nic):
        """Start QEMU on a new tap of the bridge; return its console."""
        tap = self.lab.add_tap()
        argv = [
            qemu_boot.QEMU, "-accel", "tcg", "-nographic", "-m", "512",
            "-no-reboot", *firmware_args,
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"{nic},netdev=n0,mac={self.mac}",
        ]
        process = self.lab.popen(
            self.lab.client_ns, argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return qemu_boot.GuestConsole(process)

    def start_bios_guest(self):
        support.require_tool(self, qemu_boot.SEABIOS,
                             qemu_boot.IPXE_E1000_ROM)
        return self.start_guest(
            ["-machine", "pc,graphics=off", "-boot", "n"], "e1000")

    def start_uefi_guest(self):
        support.require_tool(self, qemu_boot.OVMF_CODE, qemu_boot.OVMF_VARS)
        variables = os.path.join(self.workdir, "OVMF_VARS.fd")
        shutil.copy(qemu_boot.OVMF_VARS, variables)
        firmware_args = [
            "-machine", "q35",
            "-drive", (f"if=pflash,format=raw,readonly=on,"
                       f"file={qemu_boot.OVMF_CODE}"),
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]
        # An empty romfile keeps iPXE's EFI ROM off the NIC, so OVMF's own
        # PXE client boots.
        return self.start_guest(
            firmware_args, "virtio-net-pci,romfile=,bootindex=1")

    def describe(self, console):
        return (
            f"\nQEMU outcome: {console.outcome} after "
            f"{console.seconds:.1f} s, exit status "
            f"{console.process.returncode}, guest MAC {self.mac}"
            f"\n--- serial console, last {qemu_boot.CONSOLE_TAIL_CHARS} "
            f"characters\n{console.tail()}\n{self.log_tails()}")

    def assert_booted_through_proxy(self, console, files):
        """Check the token, QEMU's exit and the logs of both servers."""
        context = self.describe(console)
        if self.token_line not in console.text:
            self.fail(f"{self.token_line!r} not found on the serial "
                      f"console{context}")
        self.assertEqual(console.outcome, "exited", context)
        self.assertEqual(console.process.returncode, 0, context)
        self.assertNotEqual(
            self.server_lines(rf"DHCPOFFER to {self.mac} proxy "), [],
            context)
        self.assertEqual(
            self.server_lines(rf"DHCP(OFFER|ACK) to {self.mac} yiaddr="),
            [], context)
        self.assertRegex(self.dnsmasq.log_text(),
                         rf"DHCPACK\(\S+\) 192\.0\.2\.\d+ {self.mac}",
                         context)
        for name in files:
            with self.subTest(file=name):
                self.assertNotEqual(
                    self.server_lines(rf"\bsent {re.escape(name)} to "
                                      rf"192\.0\.2\."), [], context)

    def test_bios_ipxe_boots_script_through_proxy(self):
        # The root has no undionly.kpxe: the iPXE ROM must get the script.
        chained = self.build_ipxe_scripts()
        self.start_servers()
        console = self.start_bios_guest()

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        self.assert_booted_through_proxy(console, ["boot.ipxe", chained])

    def test_uefi_boots_ipxe_efi_through_proxy(self):
        support.require_tool(self, qemu_boot.IPXE_EFI)
        chained = self.build_ipxe_scripts()
        shutil.copy(qemu_boot.IPXE_EFI, self.root)
        self.start_servers()
        console = self.start_uefi_guest()

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        self.assert_booted_through_proxy(
            console, ["ipxe.efi", "boot.ipxe", chained])
        # OVMF gets no option 43 from proxyDHCP, so it sends a
        # DHCPREQUEST to the boot server for its file.
        context = self.describe(console)
        self.assertNotEqual(
            self.server_lines(rf"DHCPREQUEST from {self.mac} via \S+:4011"),
            [], context)
        self.assertNotEqual(
            self.server_lines(rf"DHCPACK to {self.mac} proxy "), [],
            context)


class TestClientsBesideOtherServer(ProxyLabTestCase):
    """Linux DHCP clients on a bridge with dnsmasq and pxeserver."""

    def test_dhclient_lease_comes_from_dnsmasq(self):
        support.require_tool(self, "dhclient")
        mac = random_mac()
        namespace, iface = self.add_client_namespace(mac)
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()
        self.start_pxeserver("--mode", "proxy", "--log-level", "debug")
        lease_file = os.path.join(self.workdir, "dhclient.leases")
        config_file = os.path.join(self.workdir, "dhclient.conf")
        with open(config_file, "w", encoding="utf-8") as stream:
            stream.write(f"timeout {WAIT_SECONDS // 2};\n")

        # -d keeps dhclient in the foreground after it binds, so the lab
        # kills it by process group at cleanup.
        self.lab.popen(namespace, [
            "dhclient", "-d", "-1", "-v", "-cf", config_file,
            "-sf", self.hook_script, "-lf", lease_file,
            "-pf", os.path.join(self.workdir, "dhclient.pid"), iface,
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        lease = self.wait_for_lease(lease_file)

        self.assertRegex(
            lease, rf"option dhcp-server-identifier "
                   rf"{re.escape(OTHER_SERVER_ADDRESS)};", lease)
        # Both lines show that pxeserver saw the exchange.
        self.server.wait_for_log(f"DHCPDISCOVER from {mac} ignored")
        self.server.wait_for_log(f"DHCPREQUEST from {mac} ignored")
        self.assertEqual(self.server_lines(rf"DHCP(OFFER|ACK) to {mac}"),
                         [], self.log_tails())

    def wait_for_lease(self, path):
        """Return the text of dhclient's lease file once it has a lease."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                with open(path, encoding="utf-8") as stream:
                    text = stream.read()
            except FileNotFoundError:
                text = ""
            if "dhcp-server-identifier" in text:
                return text
            if time.monotonic() > deadline:
                self.fail(f"dhclient wrote no lease to {path} within "
                          f"{WAIT_SECONDS} s\n{self.log_tails()}")
            time.sleep(POLL_SECONDS)

    def test_full_mode_warns_of_dnsmasq(self):
        support.require_tool(self, "busybox")
        namespace, iface = self.add_client_namespace(random_mac())
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()
        server = self.start_pxeserver(
            "--mode", "full", "--pool-start", FULL_MODE_POOL[0],
            "--pool-end", FULL_MODE_POOL[1])

        # -B sets the broadcast flag.  Without it dnsmasq unicasts its
        # offer to the client's MAC, and pxeserver never sees the offer.
        result = self.lab.run(namespace, [
            "busybox", "udhcpc", "-f", "-q", "-n", "-B", "-i", iface,
            "-s", self.hook_script, "-t", str(UDHCPC_DISCOVER_COUNT),
            "-T", str(UDHCPC_DISCOVER_SECONDS),
        ], timeout=WAIT_SECONDS, universal_newlines=True)

        self.assertEqual(result.returncode, 0,
                         f"{result.stderr}\n{self.log_tails()}")
        self.assertIn("mode=full", server.ready_line)
        line = server.wait_for_log(
            f"another DHCP server, {OTHER_SERVER_ADDRESS},")
        self.assertIn("WARNING", line)


if __name__ == "__main__":
    unittest.main()
