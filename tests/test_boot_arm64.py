"""Boot ARM64 firmware in QEMU from pxeserver, inside network namespaces.

Each test builds a lab (tests/netns.py), runs pxeserver.py in the server
namespace, and boots qemu-system-aarch64 (TCG, `-machine virt -cpu
cortex-a57`) on a tap device of the lab's bridge:

- AAVMF, the ARM64 build of EDK2, sends option 93 = 11 and loads
  grubnet.efi, a GRUB image that this test builds with grub-mkimage. Its
  embedded config loads grub-token.cfg over TFTP, which prints a random
  token and runs `halt`, and QEMU exits. This runs in full mode, and in
  proxy mode beside dnsmasq as the network's plain DHCP server.
- U-Boot sends option 93 = 22, and its default boot command fetches
  boot.scr.uimg. That script runs `dhcp`, `pxe get` and `pxe boot`, and
  the label of pxelinux.cfg/default runs U-Boot's `localcmd`, which the
  script set to print the label's `append` text and power off. Only
  full mode: U-Boot drops DHCP offers without an address, so it cannot
  boot through proxyDHCP.

The token exists only in a file served over TFTP, so finding it on the
serial console proves the whole chain was served. Install the tools with
.ci/install-arm64.
"""

import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
import unittest
import zlib

import netns
import support
import test_boot_qemu as qemu_boot
import test_proxy_boot as proxy_boot


# Bound on one boot, from starting QEMU to its exit. AAVMF to GRUB's halt
# took 10 to 12 s, and U-Boot to poweroff 2 to 3 s, with TCG on a 2-vCPU
# machine, so the rest is margin.
BOOT_TIMEOUT_SECONDS = 150

QEMU = "qemu-system-aarch64"
MACHINE_ARGS = ("-machine", "virt", "-cpu", "cortex-a57", "-m", "512")
AAVMF_CODE = "/usr/share/AAVMF/AAVMF_CODE.fd"
AAVMF_VARS = "/usr/share/AAVMF/AAVMF_VARS.fd"
UBOOT = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
GRUB_MKIMAGE = "grub-mkimage"
GRUB_MODULE_DIR = "/usr/lib/grub/arm64-efi"
GRUB_MODULES = ("efinet", "tftp", "net", "echo", "halt", "configfile",
                "normal")

GRUB_IMAGE = "grubnet.efi"
GRUB_CONFIG = "grub-token.cfg"
UBOOT_SCRIPT = "boot.scr.uimg"
PXELINUX_DEFAULT = "pxelinux.cfg/default"
UBOOT_DIRECTORY = "dtb/"

# Console text after which the boot cannot succeed. EDK2's boot manager
# failed or a UEFI program crashed, or GRUB reported an error. U-Boot
# rejected the script image, a command or the config file, gave up on a
# request, crashed, or fell back to its prompt. The U-Boot texts are
# spelled as U-Boot 2023.01 prints them.
FAILURE_MARKERS = (
    "BdsDxe: failed to load Boot", "Synchronous Exception", "PXE-E",
    "\nerror: ",
    "Bad Header Checksum", "Bad data crc", "Wrong Image Format",
    "Wrong Image Type", "Unknown command", "Error reading config file",
    "Retry count exceeded", "Synchronous Abort", "\n=> ",
)

# U-Boot prints each TFTP ERROR packet as "TFTP error: 'TEXT' (CODE)".
UBOOT_TFTP_ERROR = re.compile(r"TFTP error: '[^']*' \((\d+)\)")
UBOOT_FILE_NOT_FOUND = "1"
# `pxe get` prints "Retrieving file: NAME" before each request.
UBOOT_CONFIG_REQUEST = re.compile(r"Retrieving file: (pxelinux\.cfg/\S+)")

# Legacy U-Boot image header, as U-Boot 2023.01 checks it: magic, header
# CRC, time, data size, load address, entry point, data CRC, OS,
# architecture, image type, compression, name. 64 bytes, big-endian.
UIMAGE_HEADER = struct.Struct(">7I4B32s")
UIMAGE_MAGIC = 0x27051956
UIMAGE_OS_LINUX = 5
UIMAGE_ARCH_ARM64 = 22
UIMAGE_TYPE_SCRIPT = 6
UIMAGE_COMPRESSION_NONE = 0

# pxeserver's log timestamps, as "2026-12-04 18:10:00,123".
LOG_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.](\d{3})")

# Upper bound on the time from the server's first pxelinux.cfg/ rejection
# to its transfer of pxelinux.cfg/default. U-Boot 2023.01 sends the TFTP
# option timeout=5, so one name without an ERROR reply costs at least
# 5 s. Ten names with ERROR replies took 0.05 s.
PXE_LOOKUP_SECONDS = 5

LOG_TAIL_LINES = 60


def build_script_image(script, name="pxeserver test"):
    """Return a legacy U-Boot script image (`mkimage -T script` format).

    The data is a table of part lengths ending with a zero word, then the
    script. Both CRCs are CRC-32 (zlib's), and the header CRC is computed
    with its own field set to zero.
    """
    body = script.encode()
    data = struct.pack(">II", len(body), 0) + body
    fields = [UIMAGE_MAGIC, 0, 0, len(data), 0, 0, zlib.crc32(data),
              UIMAGE_OS_LINUX, UIMAGE_ARCH_ARM64, UIMAGE_TYPE_SCRIPT,
              UIMAGE_COMPRESSION_NONE, name.encode()]
    header = UIMAGE_HEADER.pack(*fields)
    fields[1] = zlib.crc32(header)
    return UIMAGE_HEADER.pack(*fields) + data


def parse_log_time(line):
    """Return the seconds since the epoch of a pxeserver log line."""
    match = LOG_TIMESTAMP.match(line)
    if match is None:
        raise AssertionError(f"log line has no timestamp: {line!r}")
    seconds = time.mktime(time.strptime(match.group(1),
                                        "%Y-%m-%d %H:%M:%S"))
    return seconds + int(match.group(2)) / 1000


class ARM64Console(qemu_boot.GuestConsole):
    """A guest's serial console that stops at ARM64 failure markers."""

    def _failure_marker(self):
        for marker in FAILURE_MARKERS:
            if marker in self.text:
                return marker
        return None


class ARM64GuestMixin:
    """Guests, boot files and checks shared by the full and proxy tests.

    The test case provides `lab`, `workdir`, `root`, `server` and
    `log_tails()`.
    """

    def make_token(self):
        self.token = secrets.token_hex(8)
        self.token_line = f"boot-test-token {self.token}"
        self.mac = proxy_boot.random_mac("52:54:00")

    def write_root_file(self, name, data):
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(path, mode) as stream:
            stream.write(data)

    # --- boot files

    def build_grub_files(self, server=None):
        """Build grubnet.efi and write grub-token.cfg, which prints the token.

        GRUB does no DHCP of its own. It takes the TFTP server from the
        firmware's DHCP ACK, which names no server in proxy mode, so
        server, when given, is written into the embedded config.
        """
        support.require_tool(self, GRUB_MKIMAGE, GRUB_MODULE_DIR)
        device = "tftp" if server is None else f"tftp,{server}"
        embedded = os.path.join(self.workdir, "grub-embedded.cfg")
        with open(embedded, "w") as stream:
            stream.write(
                f"echo {GRUB_IMAGE} loading {GRUB_CONFIG}\n"
                f"configfile ({device})/{GRUB_CONFIG}\n"
                # Reached only when the served config did not halt.
                f"echo {GRUB_IMAGE} could not run {GRUB_CONFIG}\n"
                "halt\n")
        result = subprocess.run(
            [GRUB_MKIMAGE, "-O", "arm64-efi", "-d", GRUB_MODULE_DIR,
             "-p", "(tftp)/", "-c", embedded,
             "-o", os.path.join(self.root, GRUB_IMAGE), *GRUB_MODULES],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=support.WAIT_SECONDS, universal_newlines=True)
        self.assertEqual(result.returncode, 0,
                         f"grub-mkimage failed: {result.stdout}")
        self.write_root_file(GRUB_CONFIG,
                             f"echo {self.token_line}\nhalt\n")

    def build_uboot_files(self):
        """Write boot.scr.uimg and pxelinux.cfg/default, and add dtb/.

        The label's `localboot` makes `pxe boot` run the script's
        `localcmd` with the label's `append` text in `bootargs`, so the
        token line appears only when the script and the config file both
        ran.
        """
        self.write_root_file(UBOOT_SCRIPT, build_script_image(
            "echo boot.scr.uimg running\n"
            "setenv localcmd 'echo boot-test-token ${bootargs}; poweroff'\n"
            "setenv autoload no\n"
            "dhcp\n"
            # U-Boot's own EFI boot path requests this directory name when
            # the board has no fdtfile, and expects an ERROR reply.
            f"tftpboot ${{fdt_addr_r}} {UBOOT_DIRECTORY}\n"
            "pxe get\n"
            "pxe boot\n"
            "echo pxe boot returned\n"
            "poweroff\n"))
        os.mkdir(os.path.join(self.root, UBOOT_DIRECTORY))
        self.write_root_file(PXELINUX_DEFAULT, (
            "default token\n"
            "label token\n"
            "  localboot 1\n"
            f"  append {self.token}\n"))

    # --- guests

    def start_guest(self, firmware_args, nic):
        """Start QEMU on a new tap of the bridge and return its console."""
        tap = self.lab.add_tap()
        argv = [
            QEMU, "-accel", "tcg", "-nographic", "-no-reboot",
            *MACHINE_ARGS, *firmware_args,
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"{nic},netdev=n0,mac={self.mac}",
        ]
        process = self.lab.popen(
            self.lab.client_ns, argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return ARM64Console(process)

    def start_aavmf_guest(self):
        support.require_tool(self, QEMU, AAVMF_CODE, AAVMF_VARS)
        variables = os.path.join(self.workdir, "AAVMF_VARS.fd")
        shutil.copy(AAVMF_VARS, variables)
        firmware_args = [
            "-drive", f"if=pflash,format=raw,readonly=on,file={AAVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]
        # AAVMF has no e1000 driver. An empty romfile keeps QEMU from
        # looking for iPXE's x86 option ROM.
        return self.start_guest(firmware_args, "virtio-net-pci,romfile=")

    def start_uboot_guest(self):
        support.require_tool(self, QEMU, UBOOT)
        # With legacy virtio, U-Boot ignores the MAC address given here
        # and uses a fixed one.
        return self.start_guest(
            ["-bios", UBOOT],
            "virtio-net-pci,disable-legacy=on,romfile=")

    # --- checks

    def describe(self, console):
        return (
            f"\nQEMU outcome: {console.outcome} after "
            f"{console.seconds:.1f} s, exit status "
            f"{console.process.returncode}, guest MAC {self.mac}"
            f"\n--- serial console, last {qemu_boot.CONSOLE_TAIL_CHARS} "
            f"characters\n{console.tail()}\n{self.log_tails()}")

    def server_lines(self, pattern):
        """Return pxeserver's log lines that match the regex pattern."""
        return [line for line in self.server.log_text().splitlines()
                if re.search(pattern, line)]

    def assert_token_printed(self, console):
        # assertIn would repeat the whole console before the description.
        if self.token_line not in console.text:
            self.fail(f"{self.token_line!r} not found on the serial console"
                      + self.describe(console))

    def assert_guest_exited(self, console):
        self.assertEqual(console.outcome, "exited", self.describe(console))
        self.assertEqual(console.process.returncode, 0,
                         self.describe(console))

    def assert_files_sent(self, console, names):
        # GRUB requests names with a leading slash.
        for name in names:
            with self.subTest(file=name):
                self.assertNotEqual(
                    self.server_lines(rf"\bsent /?{re.escape(name)} to "
                                      rf"192\.0\.2\."), [],
                    self.describe(console))


class FullModeTestCase(ARM64GuestMixin, unittest.TestCase):
    """A lab with pxeserver in full mode as the only DHCP server."""

    def setUp(self):
        support.require_tool(self, "ip", QEMU)
        netns.require_lab(self)
        self.make_token()
        self.workdir = tempfile.mkdtemp(prefix="pxeserver-arm64-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)
        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.server = None

    def start_server(self, *extra_args):
        args = [
            "--mode", "full", "--iface", self.lab.server_iface,
            "--root", self.root,
            "--lease-file", os.path.join(self.workdir, "leases.json"),
            *extra_args,
        ]
        self.server = support.PXEServerProcess(
            args, prefix=self.lab.exec_prefix(self.lab.server_ns))
        self.addCleanup(self.server.stop)
        self.server.start()

    def log_tails(self):
        lines = self.server.log_text().splitlines()[-LOG_TAIL_LINES:]
        return (f"--- pxeserver log, last {LOG_TAIL_LINES} lines\n"
                + "\n".join(lines))


class TestAAVMFBoot(FullModeTestCase):
    """AAVMF loads a GRUB network image from pxeserver in full mode."""

    def test_aavmf_grub_prints_token(self):
        self.build_grub_files()
        self.start_server("--arm64-efi-file", GRUB_IMAGE)
        console = self.start_aavmf_guest()

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assertNotEqual(
            self.server_lines(rf"DHCPOFFER to {self.mac} .*"
                              rf"bootfile={GRUB_IMAGE}"), [],
            self.describe(console))
        self.assertNotEqual(
            self.server_lines(rf"DHCPDISCOVER from {self.mac} .*"
                              rf"arch=efi_arm64\b"), [],
            self.describe(console))
        self.assert_files_sent(console, [GRUB_IMAGE, GRUB_CONFIG])


class TestUBootBoot(FullModeTestCase):
    """U-Boot runs a served script that boots pxelinux.cfg/default."""

    def test_uboot_pxe_boot_prints_token(self):
        self.build_uboot_files()
        self.start_server("--uboot-file", UBOOT_SCRIPT)
        console = self.start_uboot_guest()

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assertNotEqual(
            self.server_lines(rf"DHCPDISCOVER from {self.mac} .*"
                              rf"arch=uboot_arm64\b"), [],
            self.describe(console))
        self.assert_files_sent(console, [UBOOT_SCRIPT, PXELINUX_DEFAULT])
        self.assert_config_lookups_fast(console)

    def assert_config_lookups_fast(self, console):
        """Check that dtb/ and each missing pxelinux.cfg/ name got ERROR 1.

        U-Boot tries names from the MAC and the address before `default`,
        and goes on to the next name only after an ERROR packet or a
        timeout.
        """
        context = self.describe(console)
        names = UBOOT_CONFIG_REQUEST.findall(console.text)
        self.assertEqual(names[-1:], [PXELINUX_DEFAULT], context)
        # One error for dtb/, then one per missing pxelinux.cfg/ name.
        codes = UBOOT_TFTP_ERROR.findall(console.text)
        self.assertEqual(len(codes), len(names), context)
        self.assertEqual(set(codes), {UBOOT_FILE_NOT_FOUND}, context)

        self.assertNotEqual(
            self.server_lines(rf"RRQ of {UBOOT_DIRECTORY} from \S+ "
                              rf"rejected: ERROR 1 "), [], context)
        # The server's WARNING lines may be rate-limited, so only the
        # first pxelinux.cfg/ rejection is certain to be logged.
        rejected = self.server_lines(
            r"RRQ of pxelinux\.cfg/\S+ from \S+ rejected: ERROR 1 ")
        self.assertNotEqual(rejected, [], context)
        sent = self.server_lines(
            rf"\bsent {re.escape(PXELINUX_DEFAULT)} to ")
        self.assertNotEqual(sent, [], context)
        lookup_seconds = (parse_log_time(sent[0])
                          - parse_log_time(rejected[0]))
        self.assertLess(lookup_seconds, PXE_LOOKUP_SECONDS, context)


class TestAAVMFProxyBoot(ARM64GuestMixin, proxy_boot.ProxyLabTestCase):
    """AAVMF gets its address from dnsmasq and GRUB from pxeserver."""

    def setUp(self):
        super().setUp()
        support.require_tool(self, QEMU)
        self.make_token()

    def test_aavmf_grub_boots_through_proxy(self):
        self.build_grub_files(server=netns.SERVER_ADDRESS)
        self.start_dnsmasq()
        self.wait_for_bridge_forwarding()
        self.start_pxeserver("--mode", "proxy",
                             "--arm64-efi-file", GRUB_IMAGE)
        console = self.start_aavmf_guest()

        console.read(timeout=BOOT_TIMEOUT_SECONDS)

        context = self.describe(console)
        self.assert_token_printed(console)
        self.assert_guest_exited(console)
        self.assertNotEqual(
            self.server_lines(rf"DHCPOFFER to {self.mac} proxy "
                              rf"bootfile={GRUB_IMAGE} arch=efi_arm64\b"),
            [], context)
        self.assertEqual(
            self.server_lines(rf"DHCP(OFFER|ACK) to {self.mac} yiaddr="),
            [], context)
        self.assertRegex(self.dnsmasq.log_text(),
                         rf"DHCPACK\(\S+\) 192\.0\.2\.\d+ {self.mac}",
                         context)
        self.assert_files_sent(console, [GRUB_IMAGE, GRUB_CONFIG])


if __name__ == "__main__":
    unittest.main()
