"""Boot real firmware in QEMU from pxeserver, inside network namespaces.

Each test builds a lab (tests/netns.py), runs pxeserver.py in the server
namespace on the server's veth end, and boots a QEMU guest (TCG, no KVM) on
a tap device in the client namespace:

- SeaBIOS with the iPXE e1000 ROM loads pxelinux.0, which loads
  ldlinux.c32, pxelinux.cfg/default and poweroff.c32, and QEMU exits.
- SeaBIOS with the iPXE ROM runs boot.ipxe, which chains a second script
  over TFTP, and that script reboots, which ends QEMU under -no-reboot.
- OVMF's own UEFI PXE client loads ipxe.efi, which runs the same two
  scripts and ends QEMU the same way.
- OVMF loads syslinux.efi, which loads ldlinux.e64 and
  pxelinux.cfg/default. Syslinux 6.04 has no efi64 poweroff module and its
  efi64 reboot.c32 faults in OVMF, so the test kills QEMU once the token
  appears.

The last file of each chain prints a random token, so finding the token on
the serial console proves the whole chain was served. Each test also checks
the DHCP and transfer lines in the server's log.

Set PXESERVER_LAB_SERVER=dnsmasq to run the same boots against dnsmasq as
a reference server (package dnsmasq-base); the default is pxeserver.py.
"""

import os
import re
import secrets
import selectors
import shutil
import subprocess
import tempfile
import time
import unittest

import netns
import support


# Bound on one boot, from starting QEMU to its exit or to the token. Boots
# took 13 to 32 s with TCG on a 2-vCPU machine, so the rest is margin.
BOOT_TIMEOUT_SECONDS = 240

LAB_SERVER = os.environ.get("PXESERVER_LAB_SERVER", "pxeserver")

QEMU = "qemu-system-x86_64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SEABIOS = "/usr/share/seabios/bios-256k.bin"
# QEMU loads this iPXE ROM (legacy and EFI images) for an e1000 NIC.
IPXE_E1000_ROM = "/usr/lib/ipxe/qemu/efi-e1000.rom"

PXELINUX = "/usr/lib/PXELINUX/pxelinux.0"
SYSLINUX_BIOS_MODULES = "/usr/lib/syslinux/modules/bios"
BIOS_MODULES = ("ldlinux.c32", "poweroff.c32", "libcom32.c32", "libutil.c32")
SYSLINUX_EFI = "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"
LDLINUX_EFI = "/usr/lib/syslinux/modules/efi64/ldlinux.e64"
IPXE_EFI = "/usr/lib/ipxe/ipxe.efi"

# Console text after which the boot cannot succeed: SeaBIOS found nothing
# to boot, OVMF's boot manager failed, a PXE ROM reported an error, or a
# UEFI program crashed.
FAILURE_MARKERS = ("No bootable device", "BdsDxe: failed to load Boot",
                   "PXE-E", "X64 Exception Type")

# CSI sequences (cursor moves, colours, modes) and two-byte escapes such as
# ESC c. OVMF moves the cursor before each character it prints.
_VT100_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|c)")

DHCP_MESSAGES = ("DHCPDISCOVER", "DHCPOFFER", "DHCPREQUEST", "DHCPACK")

CONSOLE_TAIL_CHARS = 3000
LOG_TAIL_LINES = 60


def strip_escapes(text):
    """Remove VT100 escape sequences and carriage returns from text."""
    return _VT100_ESCAPE.sub("", text).replace("\r", "")


class GuestConsole:
    """A QEMU guest's serial console, read until an end condition.

    The guest's stdout is the serial port (-nographic with stdin closed).
    Not thread safe.
    """

    def __init__(self, process):
        self.process = process
        self.text = ""
        self.outcome = None
        self.seconds = None
        self._raw = bytearray()
        self._cleaned = 0

    def _take(self, final=False):
        # Hold back a trailing escape sequence that the next read may
        # complete.
        end = len(self._raw)
        if not final:
            escape = self._raw.rfind(b"\x1b", max(self._cleaned, end - 32))
            if escape != -1 and not self._is_complete_escape(escape):
                end = escape
        chunk = self._raw[self._cleaned:end].decode("latin-1")
        self.text += strip_escapes(chunk)
        self._cleaned = end

    def _is_complete_escape(self, offset):
        text = self._raw[offset:].decode("latin-1")
        return _VT100_ESCAPE.match(text) is not None

    def _failure_marker(self):
        for marker in FAILURE_MARKERS:
            if marker in self.text:
                return marker
        return None

    def read(self, stop_text=None, timeout=BOOT_TIMEOUT_SECONDS):
        """Read the console until QEMU exits, fails or prints stop_text.

        Sets `outcome` to "exited", "stop text seen", "failure marker
        MARKER" or "timed out", kills QEMU unless it exited, and returns
        the cleaned console text.
        """
        started = time.monotonic()
        deadline = started + timeout
        stream = self.process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.outcome = "timed out"
                    break
                if not selector.select(remaining):
                    continue
                data = os.read(stream.fileno(), 65536)
                if not data:
                    self.outcome = "exited"
                    break
                self._raw += data
                self._take()
                marker = self._failure_marker()
                if marker is not None:
                    self.outcome = f"failure marker {marker!r}"
                    break
                if stop_text is not None and stop_text in self.text:
                    self.outcome = "stop text seen"
                    break
        self.seconds = time.monotonic() - started
        if self.process.poll() is None and self.outcome != "exited":
            self.process.kill()
        self.process.wait(netns.COMMAND_TIMEOUT_SECONDS)
        self._take(final=True)
        return self.text

    def tail(self):
        return self.text[-CONSOLE_TAIL_CHARS:]


class DnsmasqProcess(support.PXEServerProcess):
    """dnsmasq as a reference DHCP and TFTP server, with the same interface.

    args are dnsmasq's arguments. The ready line is dnsmasq's "TFTP root
    is" line, which it logs after binding its sockets.
    """

    @property
    def command(self):
        return self.prefix + ["dnsmasq"] + self.args

    def wait_ready(self, timeout=support.WAIT_SECONDS):
        try:
            return self.wait_for_log("TFTP root is", timeout)
        except AssertionError:
            self.stop()
            raise


def dnsmasq_arguments(iface, root, lease_file, bios_file, efi64_file,
                      ipxe_script):
    """Return dnsmasq arguments that apply pxeserver's boot file choice.

    iPXE clients are those that send user class "iPXE" (option 77).
    """
    args = [
        "--no-daemon", "--conf-file=/dev/null", "--port=0", "--pid-file=",
        # Stay root: the TFTP root is a private temporary directory.
        "--log-facility=-", "--user=root", "--group=root",
        f"--interface={iface}", "--bind-interfaces",
        "--dhcp-range=192.0.2.50,192.0.2.150", "--dhcp-authoritative",
        "--no-ping", f"--dhcp-leasefile={lease_file}",
        "--enable-tftp", f"--tftp-root={root}",
        "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-match=set:efi64,option:client-arch,9",
    ]
    if ipxe_script:
        args += [
            f"--dhcp-boot=tag:ipxe,{ipxe_script}",
            f"--dhcp-boot=tag:!ipxe,tag:!efi64,{bios_file}",
            f"--dhcp-boot=tag:!ipxe,tag:efi64,{efi64_file}",
        ]
    else:
        args += [
            f"--dhcp-boot=tag:!efi64,{bios_file}",
            f"--dhcp-boot=tag:efi64,{efi64_file}",
        ]
    return args


class TestQEMUBoot(unittest.TestCase):
    """Real firmware boots over the lab's bridge, one guest per test."""

    def setUp(self):
        support.require_tool(self, "ip", QEMU)
        if LAB_SERVER == "dnsmasq":
            support.require_tool(self, "dnsmasq")
        netns.require_lab(self)

        self.token = secrets.token_hex(8)
        self.token_line = f"boot-test-token {self.token}"
        self.workdir = tempfile.mkdtemp(prefix="pxeserver-boot-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)

        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.tap = self.lab.add_tap()
        self.server = None

    # --- setup helpers

    def build_pxelinux_files(self):
        """Copy BIOS pxelinux and its modules, and write its config.

        The config prints the token, then runs poweroff.c32, which ends QEMU.
        """
        support.require_tool(self, PXELINUX, os.path.join(
            SYSLINUX_BIOS_MODULES, "ldlinux.c32"))
        shutil.copy(PXELINUX, self.root)
        for module in BIOS_MODULES:
            shutil.copy(os.path.join(SYSLINUX_BIOS_MODULES, module),
                        self.root)
        self.write_pxelinux_config(
            "DEFAULT off\n"
            "PROMPT 0\n"
            f"SAY {self.token_line}\n"
            "LABEL off\n"
            "  COM32 poweroff.c32\n"
        )

    def build_syslinux_efi_files(self):
        """Copy efi64 syslinux, with a config that prints the token.

        With no DEFAULT label, syslinux then waits at its boot prompt.
        """
        support.require_tool(self, SYSLINUX_EFI, LDLINUX_EFI)
        shutil.copy(SYSLINUX_EFI, self.root)
        shutil.copy(LDLINUX_EFI, self.root)
        self.write_pxelinux_config(f"PROMPT 0\nSAY {self.token_line}\n")

    def write_pxelinux_config(self, text):
        os.mkdir(os.path.join(self.root, "pxelinux.cfg"))
        self.write_root_file("pxelinux.cfg/default", text)

    def build_ipxe_scripts(self):
        """Write boot.ipxe, which chains a script named after the token.

        Returns the second script's name. Only that script prints the token
        line, so the line proves both scripts were served. The line after
        it is there because iPXE's serial output loses its last character
        when the script reboots at once.
        """
        chained = f"chain-{self.token}.ipxe"
        self.write_root_file(
            "boot.ipxe",
            "#!ipxe\n"
            "echo boot.ipxe running\n"
            f"chain {chained}\n",
        )
        self.write_root_file(
            chained,
            "#!ipxe\n"
            f"echo {self.token_line}\n"
            "echo rebooting\n"
            "reboot\n",
        )
        return chained

    def write_root_file(self, name, text):
        with open(os.path.join(self.root, name), "w") as stream:
            stream.write(text)

    def start_server(self, bios_file, efi64_file, ipxe_script):
        """Start the lab's server (pxeserver, or dnsmasq) in server_ns."""
        lease_file = os.path.join(self.workdir, "leases")
        prefix = self.lab.exec_prefix(self.lab.server_ns)
        if LAB_SERVER == "dnsmasq":
            args = dnsmasq_arguments(
                self.lab.server_iface, self.root, lease_file,
                bios_file, efi64_file, ipxe_script,
            )
            self.server = DnsmasqProcess(args, prefix=prefix)
        else:
            args = [
                "--iface", self.lab.server_iface, "--root", self.root,
                "--lease-file", lease_file, "--bios-file", bios_file,
                "--efi64-file", efi64_file, "--ipxe-script", ipxe_script,
            ]
            self.server = support.PXEServerProcess(args, prefix=prefix)
        self.addCleanup(self.server.stop)
        self.server.start()

    def start_guest(self, firmware_args, nic):
        """Start QEMU in client_ns on the lab's tap and return its console."""
        self.mac = "52:54:00:" + ":".join(
            f"{byte:02x}" for byte in secrets.token_bytes(3))
        argv = [
            QEMU, "-accel", "tcg", "-nographic", "-m", "512",
            "-no-reboot", *firmware_args,
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"{nic},netdev=n0,mac={self.mac}",
        ]
        process = self.lab.popen(
            self.lab.client_ns, argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        return GuestConsole(process)

    def start_bios_guest(self):
        support.require_tool(self, SEABIOS, IPXE_E1000_ROM)
        return self.start_guest(
            ["-machine", "pc,graphics=off", "-boot", "n"], "e1000")

    def start_uefi_guest(self):
        support.require_tool(self, OVMF_CODE, OVMF_VARS)
        variables = os.path.join(self.workdir, "OVMF_VARS.fd")
        shutil.copy(OVMF_VARS, variables)
        firmware_args = [
            "-machine", "q35",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]
        # An empty romfile keeps iPXE's EFI ROM off the NIC, so OVMF's own
        # PXE client boots.
        return self.start_guest(
            firmware_args, "virtio-net-pci,romfile=,bootindex=1")

    # --- checks

    def describe(self, console):
        log_lines = self.server.log_text().splitlines()[-LOG_TAIL_LINES:]
        return (
            f"\nQEMU outcome: {console.outcome} after "
            f"{console.seconds:.1f} s, exit status "
            f"{console.process.returncode}, guest MAC {self.mac}"
            f"\n--- serial console, last {CONSOLE_TAIL_CHARS} characters\n"
            f"{console.tail()}"
            f"\n--- {LAB_SERVER} log, last {LOG_TAIL_LINES} lines\n"
            + "\n".join(log_lines)
        )

    def assert_token_printed(self, console):
        # assertIn would repeat the whole console before the description.
        if self.token_line not in console.text:
            self.fail(f"{self.token_line!r} not found on the serial console"
                      + self.describe(console))

    def assert_guest_exited(self, console):
        self.assertEqual(console.outcome, "exited", self.describe(console))
        self.assertEqual(console.process.returncode, 0,
                         self.describe(console))

    def assert_dhcp_exchange_logged(self, console):
        log = self.server.log_text()
        for message in DHCP_MESSAGES:
            with self.subTest(message=message):
                self.assertRegex(
                    log, rf"{message}\b.*\b{self.mac}\b",
                    self.describe(console))

    def assert_files_sent(self, console, names):
        # pxeserver logs "sent NAME to ADDR:PORT ..."; dnsmasq logs the
        # full path, "sent ROOT/NAME to ADDR".
        log = self.server.log_text()
        for name in names:
            with self.subTest(file=name):
                self.assertRegex(
                    log, rf"\bsent (\S*/)?{re.escape(name)} to 192\.0\.2\.",
                    self.describe(console))

    # --- tests

    def test_bios_pxelinux_powers_off(self):
        self.build_pxelinux_files()
        self.start_server("pxelinux.0", "ipxe.efi", "")
        console = self.start_bios_guest()

        console.read()

        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assert_dhcp_exchange_logged(console)
        self.assert_files_sent(console, [
            "pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default",
            "poweroff.c32",
        ])

    def test_bios_ipxe_chains_script(self):
        # The root has no undionly.kpxe, so the boot fails unless the
        # server offers the script to the iPXE ROM.
        chained = self.build_ipxe_scripts()
        self.start_server("undionly.kpxe", "ipxe.efi", "boot.ipxe")
        console = self.start_bios_guest()

        console.read()

        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assert_dhcp_exchange_logged(console)
        self.assert_files_sent(console, ["boot.ipxe", chained])

    def test_uefi_ipxe_efi_chains_script(self):
        support.require_tool(self, IPXE_EFI)
        chained = self.build_ipxe_scripts()
        shutil.copy(IPXE_EFI, self.root)
        self.start_server("undionly.kpxe", "ipxe.efi", "boot.ipxe")
        console = self.start_uefi_guest()

        console.read()

        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assert_dhcp_exchange_logged(console)
        self.assert_files_sent(console, ["ipxe.efi", "boot.ipxe", chained])

    def test_uefi_syslinux_reads_config(self):
        self.build_syslinux_efi_files()
        self.start_server("pxelinux.0", "syslinux.efi", "boot.ipxe")
        console = self.start_uefi_guest()

        console.read(stop_text=self.token_line)

        self.assert_token_printed(console)
        self.assert_dhcp_exchange_logged(console)
        self.assert_files_sent(console, [
            "syslinux.efi", "ldlinux.e64", "pxelinux.cfg/default",
        ])


if __name__ == "__main__":
    unittest.main()
