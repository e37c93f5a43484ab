"""Boot real firmware in QEMU over HTTP from pxeserver, in namespaces.

Each test builds a lab (tests/netns.py), runs pxeserver.py in full mode in
the server namespace with --http-port 80, and boots a QEMU guest (TCG, no
KVM) on a tap device in the client namespace:

- SeaBIOS with the iPXE e1000 ROM gets http://192.0.2.1:80/boot.ipxe in
  the DHCP offer, because the ROM is iPXE.  That script chains a second
  script named after a random token from http://${next-server}/, which
  prints the token and reboots, which ends QEMU under -no-reboot.
- OVMF's own UEFI HTTP Boot gets http://192.0.2.1:80/ipxe.efi, and that
  iPXE runs the same two scripts over HTTP.

Finding the token on the serial console proves the chain was served.  Each
test also checks the DHCP offer and the HTTP lines in the server's log,
and that no file went over TFTP.
"""

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import unittest

import netns
import support
import test_boot_qemu as qemu_boot


HTTP_PORT = 80
SERVER_URL = f"http://{netns.SERVER_ADDRESS}:{HTTP_PORT}"
IPXE_SCRIPT = "boot.ipxe"

# OVMF 2022.11 (Debian 12) tries PXE over IPv4, then over IPv6, before
# HTTP Boot over IPv4.  pxeserver answers PXE too, so HTTP Boot would never
# run.  These fw_cfg switches remove both PXE boot options.  With PXE left
# on and failing instead, HTTP Boot started only after about 65 s.
OVMF_PXE_OFF = (
    "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
    "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
)
OVMF_HTTP_BOOT_TEXT = "Start HTTP Boot over IPv4"


class TestHTTPBoot(unittest.TestCase):
    """Real firmware boots from the HTTP server, one guest per test."""

    def setUp(self):
        support.require_tool(self, "ip", qemu_boot.QEMU)
        netns.require_lab(self)

        self.token = secrets.token_hex(8)
        self.token_line = f"http-boot-test-token {self.token}"
        self.workdir = tempfile.mkdtemp(prefix="pxeserver-http-boot-")
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.root = os.path.join(self.workdir, "root")
        os.mkdir(self.root)

        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.tap = self.lab.add_tap()
        self.server = None
        self.mac = None

    # --- setup helpers

    def write_ipxe_scripts(self):
        """Write boot.ipxe, which chains a script named after the token.

        Returns the second script's name.  Only that script prints the
        token line, and it is fetched by an explicit http:// URL, so the
        line proves both scripts came over HTTP.  The last echo is there
        because iPXE's serial output loses its last character when the
        script reboots at once.
        """
        chained = f"token-{self.token}.ipxe"
        self.write_root_file(
            IPXE_SCRIPT,
            "#!ipxe\n"
            "echo boot.ipxe running\n"
            f"chain http://${{next-server}}/{chained}\n",
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

    def start_server(self):
        """Start pxeserver in full mode with HTTP on port 80 in server_ns.

        The root has no undionly.kpxe, so a BIOS boot fails unless the
        iPXE ROM gets the script URL.
        """
        args = [
            "--iface", self.lab.server_iface, "--root", self.root,
            "--mode", "full",
            "--lease-file", os.path.join(self.workdir, "leases"),
            "--bios-file", "undionly.kpxe", "--efi64-file", "ipxe.efi",
            "--ipxe-script", IPXE_SCRIPT, "--http-port", str(HTTP_PORT),
        ]
        self.server = support.PXEServerProcess(
            args, prefix=self.lab.exec_prefix(self.lab.server_ns))
        self.addCleanup(self.server.stop)
        self.server.start()

    def start_guest(self, firmware_args, nic):
        """Start QEMU in client_ns on the lab's tap and return its console."""
        self.mac = "52:54:00:" + ":".join(
            f"{byte:02x}" for byte in secrets.token_bytes(3))
        argv = [
            qemu_boot.QEMU, "-accel", "tcg", "-nographic", "-m", "512",
            "-no-reboot", *firmware_args,
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"{nic},netdev=n0,mac={self.mac}",
        ]
        process = self.lab.popen(
            self.lab.client_ns, argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        return qemu_boot.GuestConsole(process)

    # --- checks

    def describe(self, console):
        log_lines = self.server.log_text().splitlines()
        log_tail = log_lines[-qemu_boot.LOG_TAIL_LINES:]
        return (
            f"\nQEMU outcome: {console.outcome} after "
            f"{console.seconds:.1f} s, exit status "
            f"{console.process.returncode}, guest MAC {self.mac}"
            f"\n--- serial console, last {qemu_boot.CONSOLE_TAIL_CHARS} "
            f"characters\n{console.tail()}"
            f"\n--- pxeserver log, last {qemu_boot.LOG_TAIL_LINES} lines\n"
            + "\n".join(log_tail)
        )

    def assert_console_shows(self, console, text):
        # assertIn would repeat the whole console before the description.
        if text not in console.text:
            self.fail(f"{text!r} not found on the serial console"
                      + self.describe(console))

    def assert_guest_exited(self, console):
        self.assertEqual(console.outcome, "exited", self.describe(console))
        self.assertEqual(console.process.returncode, 0,
                         self.describe(console))

    def assert_offered_url(self, console, url):
        self.assertRegex(
            self.server.log_text(),
            rf"DHCPOFFER to {self.mac} .*bootfile={re.escape(url)} ",
            self.describe(console))

    def assert_http_sent(self, console, names):
        log = self.server.log_text()
        for name in names:
            with self.subTest(file=name):
                self.assertRegex(
                    log,
                    rf"GET /{re.escape(name)} from 192\.0\.2\.\d+:\d+ "
                    rf"status=200 ",
                    self.describe(console))

    def assert_nothing_over_tftp(self, console):
        self.assertNotRegex(self.server.log_text(), r"\bRRQ from ",
                            self.describe(console))

    # --- tests

    def test_bios_ipxe_chains_over_http(self):
        support.require_tool(self, qemu_boot.SEABIOS,
                             qemu_boot.IPXE_E1000_ROM)
        chained = self.write_ipxe_scripts()
        self.start_server()
        console = self.start_guest(
            ["-machine", "pc,graphics=off", "-boot", "n"], "e1000")

        console.read()

        self.assert_console_shows(console, self.token_line)
        self.assert_guest_exited(console)
        self.assert_offered_url(console, f"{SERVER_URL}/{IPXE_SCRIPT}")
        self.assert_http_sent(console, [IPXE_SCRIPT, chained])
        self.assert_nothing_over_tftp(console)

    def test_uefi_http_boot_loads_ipxe(self):
        support.require_tool(self, qemu_boot.OVMF_CODE, qemu_boot.OVMF_VARS,
                             qemu_boot.IPXE_EFI)
        chained = self.write_ipxe_scripts()
        shutil.copy(qemu_boot.IPXE_EFI, self.root)
        self.start_server()
        variables = os.path.join(self.workdir, "OVMF_VARS.fd")
        shutil.copy(qemu_boot.OVMF_VARS, variables)
        firmware_args = [
            "-machine", "q35", *OVMF_PXE_OFF,
            "-drive", "if=pflash,format=raw,readonly=on,"
                      f"file={qemu_boot.OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]
        # An empty romfile keeps iPXE's EFI ROM off the NIC, so OVMF's own
        # network stack runs HTTP Boot.
        console = self.start_guest(
            firmware_args, "virtio-net-pci,romfile=,bootindex=1")

        console.read()

        self.assert_console_shows(console, OVMF_HTTP_BOOT_TEXT)
        self.assert_console_shows(console, self.token_line)
        self.assert_guest_exited(console)
        self.assert_offered_url(console, f"{SERVER_URL}/ipxe.efi")
        self.assert_http_sent(console, ["ipxe.efi", IPXE_SCRIPT, chained])
        self.assert_nothing_over_tftp(console)


if __name__ == "__main__":
    unittest.main()
