"""TFTP, DHCP and a QEMU boot through a bridge that loses UDP packets.

Each test builds a lab (tests/netns.py) and adds an nftables table of the
`bridge` family in the client namespace. Its forward chain drops a random
LOSS_PERCENT % of the UDP packets that cross the bridge, in both
directions, so neither end learns of a loss, as on a lossy wire. (A rule
in the sender's own output hook would make sendto() fail with EPERM
instead.) The clients are:

- busybox tftp, fetching a random file with blksize 1468 in lock step
  (windowsize 1), and atftp, fetching it with windowsize 16, from
  pxeserver in --mode off. The SHA-256 of the copy must match, and the
  server's transfer line must count retransmits, which proves that
  packets were lost;
- busybox udhcpc, which must still get leases from --mode full;
- SeaBIOS with the iPXE ROM in QEMU, which must run an iPXE script
  from --mode full to its end, after downloading a 256 KiB file.

The rule spares one packet: the client's ACK of the file's last block.
busybox tftp and atftp exit right after sending it, without the dally of
RFC 1350. If that ACK were lost, pxeserver would retransmit the last
window to a closed port until its retries ran out. It would then log a
failed transfer instead of the line this test reads.

The lock-step client is busybox tftp, which sends no RFC 2349 timeout
option, so pxeserver's adaptive retransmission timeout runs. curl 7.88
sends that option (6 s by default, 1 s with --connect-timeout 1), and
pxeserver then waits that long before each retransmission. With about
135 lost packets on a 1 MiB file, that is an estimated 135 s or more.
tftp-hpa sends no blksize, and its 4096 blocks of 512 bytes took over
300 s here. atftp in lock step had not finished after 150 s.

A missing tool or firmware skips its test, or fails it when
PXESERVER_REQUIRE_PEERS=1.
"""

import ipaddress
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


LOSS_PERCENT = 10
NFT_TABLE = "pxeserver_loss"
NFT_CHAIN = "forward"

CLIENT_ADDRESS = "192.0.2.2"
FILE_BYTES = 1 << 20
BLKSIZE = 1468  # 1468 + 4 (TFTP) + 8 (UDP) + 20 (IPv4) = MTU 1500
WINDOWSIZE = 16

# The block number of the file's last DATA block, whose ACK is spared.
LAST_BLOCK = FILE_BYTES // BLKSIZE + 1
TFTP_ACK_OPCODE = 4

# Runs of a client that gave up by itself. atftp 0.8 aborts with "unexpected
# OACK" when the ACK of the OACK is lost and the server sends the OACK
# again, instead of acknowledging it again.
FETCH_ATTEMPTS = 3

# Bound on one lossy fetch. On a 2-vCPU machine the lock-step fetch of
# 2 MiB took 95 to 126 s, the windowsize 16 fetch 41 to 179 s; this file
# fetches 1 MiB to keep the suite short.
FETCH_TIMEOUT_SECONDS = 240

# Bound on one QEMU boot. The boot takes about 20 s without loss.
BOOT_TIMEOUT_SECONDS = qemu_boot.BOOT_TIMEOUT_SECONDS

# The boot's script downloads this file. Its few hundred packets make a
# boot that loses none very unlikely, unlike the DHCP exchange and the
# script alone: with their 11 UDP packets, 0.9 ** 11, about a third of
# the boots, would lose none.
BOOT_IMAGE_NAME = "payload.bin"
BOOT_IMAGE_BYTES = 256 << 10

POOL_START = "192.0.2.100"
POOL_END = "192.0.2.199"
# Leases requested in turn, each by a client with a new MAC address. With
# about 80 packets, all of them pass the rule once in 4000 runs or so.
DHCP_CLIENT_COUNT = 20
# udhcpc sends up to this many DISCOVERs, this many seconds apart.
UDHCPC_DISCOVER_COUNT = 8
UDHCPC_DISCOVER_SECONDS = 1
UDHCPC_ATTEMPTS = 3  # runs of udhcpc per client before the test fails

POLL_SECONDS = 0.05
LOG_TAIL_LINES = 40

# udhcpc's hook script. Its default script rewrites /etc/resolv.conf,
# which network namespaces share with the host. This one only records
# the address of a bound event.
UDHCPC_SCRIPT = """\
#!/bin/sh
if [ "$1" = bound ]; then
    echo "$ip" > {path}
fi
exit 0
"""

_SENT_LINE = re.compile(
    r"\bsent (\S+) to (\S+) bytes=(\d+) .*\bretransmits=(\d+)")
_COUNTER = re.compile(r"counter packets (\d+)")


def random_mac():
    """Return a random locally administered unicast MAC address."""
    return "02:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(5))


class _LossyLabTestCase(unittest.TestCase):
    """A lab whose bridge drops LOSS_PERCENT % of the UDP packets."""

    tool_names = ()

    def setUp(self):
        support.require_tool(self, "ip", "nft", *self.tool_names)
        netns.require_lab(self)
        self.workdir = tempfile.mkdtemp(prefix="pxeserver-loss-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)
        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.server = None
        self.add_loss_table()

    # --- nftables

    def nft(self, *args):
        result = self.lab.run(self.lab.client_ns, ["nft", *args],
                              universal_newlines=True)
        self.assertEqual(result.returncode, 0,
                         f"nft {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def add_loss_table(self):
        """Add the table whose forward chain drops UDP at random.

        The first rule counts the UDP packets that cross the bridge, the
        second lets the ACK of block LAST_BLOCK pass (see the module
        docstring), the third drops LOSS_PERCENT % of the rest and counts
        those.
        """
        self.nft("add", "table", "bridge", NFT_TABLE)
        self.addCleanup(self.delete_loss_table)
        self.nft("add", "chain", "bridge", NFT_TABLE, NFT_CHAIN,
                 "{ type filter hook forward priority 0; policy accept; }")
        udp = ["meta", "l4proto", "udp"]
        self.nft("add", "rule", "bridge", NFT_TABLE, NFT_CHAIN, *udp,
                 "counter")
        # The TFTP opcode and block number are the 32 bits after the
        # 64-bit UDP header.
        last_ack = (TFTP_ACK_OPCODE << 16) | LAST_BLOCK
        self.nft("add", "rule", "bridge", NFT_TABLE, NFT_CHAIN, *udp,
                 "udp", "length", "12", "@th,64,32", f"{last_ack:#010x}",
                 "accept")
        self.nft("add", "rule", "bridge", NFT_TABLE, NFT_CHAIN, *udp,
                 "numgen", "random", "mod", "100", "<", str(LOSS_PERCENT),
                 "counter", "drop")

    def delete_loss_table(self):
        # Deleting the namespace removes the table too, but this cleanup
        # runs first.
        self.lab.run(self.lab.client_ns,
                     ["nft", "delete", "table", "bridge", NFT_TABLE])

    def loss_counts(self):
        """Return (UDP packets that reached the bridge, packets dropped)."""
        text = self.nft("list", "chain", "bridge", NFT_TABLE, NFT_CHAIN)
        seen, dropped = (int(count) for count in _COUNTER.findall(text))
        return seen, dropped

    def describe_loss(self):
        seen, dropped = self.loss_counts()
        return f"the bridge dropped {dropped} of {seen} UDP packets"

    # --- server and clients

    def start_server(self, *args):
        prefix = self.lab.exec_prefix(self.lab.server_ns)
        self.server = support.PXEServerProcess(
            ["--root", self.root, *args], prefix=prefix)
        self.addCleanup(self.server.stop)
        self.server.start()
        return self.server

    def log_tail(self):
        lines = self.server.log_text().splitlines()[-LOG_TAIL_LINES:]
        return "pxeserver log tail:\n" + "\n".join(lines)

    def add_client_namespace(self):
        """Add a namespace with a veth end on the bridge; return both.

        The client's packets cross the bridge, and so the loss rule,
        only from a port of its own: the bridge's own address would take
        the input and output hooks instead of forward.
        """
        namespace = self.lab.add_namespace("c0")
        iface = self.lab.add_veth(namespace)
        self.wait_for_bridge_forwarding()
        return namespace, iface

    def wait_for_bridge_forwarding(self):
        """Wait until each bridge port forwards frames.

        A new port drops frames for up to a second, and those losses
        would add to the rule's.
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


class TestTFTPUnderLoss(_LossyLabTestCase):
    """TFTP clients fetch a random file through the lossy bridge."""

    def setUp(self):
        super().setUp()
        self.name = "random.bin"
        path = support.write_random_file(
            os.path.join(self.root, self.name), FILE_BYTES)
        self.sha256 = support.sha256_file(path)
        self.output = os.path.join(self.workdir, "copy.bin")
        self.client_ns, iface = self.add_client_namespace()
        result = self.lab.run(
            self.client_ns,
            ["ip", "address", "add", f"{CLIENT_ADDRESS}/24", "dev", iface])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.start_server("--mode", "off", "--tftp-address",
                          netns.SERVER_ADDRESS, "--tftp-port", "0")

    def fetch(self, argv):
        """Run the client argv, which writes self.output; check the copy.

        A client that gives up by itself, with a nonzero exit status, runs
        again, up to FETCH_ATTEMPTS times in all. Returns the
        retransmits= count of the server's transfer line.
        """
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            mark = self.server.log_mark()
            started = time.monotonic()
            try:
                result = self.lab.run(
                    self.client_ns, argv, timeout=FETCH_TIMEOUT_SECONDS,
                    universal_newlines=True, errors="replace")
            except subprocess.TimeoutExpired:
                self.fail(f"{argv[0]} still running after "
                          f"{FETCH_TIMEOUT_SECONDS} s; "
                          f"{self.describe_loss()}\n{self.log_tail()}")
            seconds = time.monotonic() - started
            if result.returncode == 0:
                break
        context = (f"{argv} attempt {attempt} took {seconds:.1f} s; "
                   f"{self.describe_loss()}")
        self.assertEqual(
            result.returncode, 0,
            f"{context}; exit status {result.returncode}:\n"
            f"{result.stderr[-2000:]}\n{self.log_tail()}")
        self.assertEqual(support.sha256_file(self.output), self.sha256,
                         context)
        line = self.server.wait_for_log(f"sent {self.name} to ", since=mark)
        match = _SENT_LINE.search(line)
        self.assertIsNotNone(match, f"unexpected transfer line: {line}")
        self.assertEqual(int(match.group(3)), FILE_BYTES, line)
        return int(match.group(4))

    def test_lockstep_fetch_survives_loss(self):
        support.require_tool(self, "busybox")
        retransmits = self.fetch([
            "busybox", "tftp", "-g", "-b", str(BLKSIZE), "-r", self.name,
            "-l", self.output, netns.SERVER_ADDRESS,
            str(self.server.tftp_port)])
        self.assertGreater(retransmits, 0, self.describe_loss())

    def test_windowsize_16_fetch_survives_loss(self):
        support.require_tool(self, "atftp")
        retransmits = self.fetch([
            "atftp", "--option", f"windowsize {WINDOWSIZE}",
            "--option", f"blksize {BLKSIZE}", "--get",
            "--remote-file", self.name, "--local-file", self.output,
            netns.SERVER_ADDRESS, str(self.server.tftp_port)])
        self.assertGreater(retransmits, 0, self.describe_loss())


class TestDHCPUnderLoss(_LossyLabTestCase):
    """busybox udhcpc gets leases through the lossy bridge."""

    tool_names = ("busybox",)

    def test_udhcpc_clients_get_leases(self):
        client_ns, iface = self.add_client_namespace()
        self.start_server(
            "--mode", "full", "--iface", self.lab.server_iface,
            "--lease-file", os.path.join(self.workdir, "leases.json"),
            "--pool-start", POOL_START, "--pool-end", POOL_END)
        bound_path = os.path.join(self.workdir, "bound")
        script = os.path.join(self.workdir, "udhcpc.sh")
        with open(script, "w", encoding="utf-8") as stream:
            stream.write(UDHCPC_SCRIPT.format(path=bound_path))
        os.chmod(script, stat.S_IRWXU)
        pool = (ipaddress.IPv4Address(POOL_START),
                ipaddress.IPv4Address(POOL_END))
        for number in range(DHCP_CLIENT_COUNT):
            with self.subTest(client=number):
                if os.path.exists(bound_path):
                    os.unlink(bound_path)
                mac = random_mac()
                result = self.lab.run(
                    client_ns,
                    ["ip", "link", "set", "dev", iface, "address", mac])
                self.assertEqual(result.returncode, 0, result.stderr)
                argv = ["busybox", "udhcpc", "-f", "-n", "-q", "-i", iface,
                        "-s", script, "-t", str(UDHCPC_DISCOVER_COUNT),
                        "-T", str(UDHCPC_DISCOVER_SECONDS)]
                # udhcpc sends its DHCPREQUEST 3 times and then gives up;
                # at 10 % loss each way that fails for about 1 client in
                # 140.  A real client starts over, so the test does too.
                for _ in range(UDHCPC_ATTEMPTS):
                    try:
                        result = self.lab.run(client_ns, argv,
                                              timeout=WAIT_SECONDS,
                                              universal_newlines=True)
                    except subprocess.TimeoutExpired:
                        self.fail(f"udhcpc still running after "
                                  f"{WAIT_SECONDS} s; {self.describe_loss()}")
                    if result.returncode == 0:
                        break
                context = (f"client {mac}; {self.describe_loss()}\n"
                           f"{result.stderr}\n{self.log_tail()}")
                self.assertEqual(result.returncode, 0, context)
                with open(bound_path, encoding="utf-8") as stream:
                    address = ipaddress.IPv4Address(stream.read().strip())
                self.assertTrue(pool[0] <= address <= pool[1],
                                f"{address} {context}")
        seen, dropped = self.loss_counts()
        self.assertGreater(dropped, 0, f"no loss among {seen} packets")


class TestBootUnderLoss(_LossyLabTestCase):
    """SeaBIOS and the iPXE ROM in QEMU run an iPXE script to its end."""

    tool_names = (qemu_boot.QEMU,)

    def test_bios_ipxe_script_runs_to_end(self):
        support.require_tool(self, qemu_boot.SEABIOS,
                             qemu_boot.IPXE_E1000_ROM)
        tap = self.lab.add_tap()
        token_line = f"loss-test-token {secrets.token_hex(8)}"
        support.write_random_file(
            os.path.join(self.root, BOOT_IMAGE_NAME), BOOT_IMAGE_BYTES)
        with open(os.path.join(self.root, "boot.ipxe"), "w") as stream:
            # imgfetch ends the script on a failed download, before the
            # token. The line after the token is there because iPXE's
            # serial output loses its last character when the script
            # reboots.
            stream.write(f"#!ipxe\nimgfetch {BOOT_IMAGE_NAME}\n"
                         f"echo {token_line}\necho rebooting\nreboot\n")
        self.start_server(
            "--mode", "full", "--iface", self.lab.server_iface,
            "--lease-file", os.path.join(self.workdir, "leases.json"),
            "--ipxe-script", "boot.ipxe")
        mac = random_mac()
        argv = [
            qemu_boot.QEMU, "-accel", "tcg", "-nographic", "-m", "512",
            "-no-reboot", "-machine", "pc,graphics=off", "-boot", "n",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={mac}",
        ]
        process = self.lab.popen(
            self.lab.client_ns, argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        console = qemu_boot.GuestConsole(process)

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        context = (f"QEMU {console.outcome} after {console.seconds:.1f} s, "
                   f"status {process.returncode}; {self.describe_loss()}\n"
                   f"--- console tail\n{console.tail()}\n{self.log_tail()}")
        # assertIn would print the whole console before the context.
        self.assertTrue(token_line in console.text, context)
        self.assertEqual(console.outcome, "exited", context)
        self.assertEqual(process.returncode, 0, context)
        seen, dropped = self.loss_counts()
        self.assertGreater(dropped, 0, f"no loss among {seen} packets")


if __name__ == "__main__":
    unittest.main()
