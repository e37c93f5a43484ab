"""Tests of the command line: every flag, main()'s exit status and a run.

TestFlags has one test per setting flag: a good value must reach the
Config, and a bad one must make argparse exit with status 2 and name the
value.  TestServerProcess runs pxeserver.py as a child process in TFTP-only
mode on 127.0.0.1, so no DHCP traffic is sent anywhere.
"""

import contextlib
import io
import ipaddress
import os
import socket
import sys
import tempfile
import unittest

from support import PXESERVER_PATH
from support import REPO_ROOT
from support import WAIT_SECONDS
from support import PXEServerProcess
from support import run_command

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)


LOOPBACK = "127.0.0.1"
ADDRESS = ipaddress.IPv4Address

# An interface name that only has to pass check_config.  The tests never
# bind it, so it need not exist.
IFACE = "pxetest0"


def run_parser(argv):
    """Parse argv and return (namespace or exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            result = pxeserver.build_parser().parse_args(argv)
        except SystemExit as exc:
            result = exc.code
    return result, stdout.getvalue(), stderr.getvalue()


class _TempDirTestCase(unittest.TestCase):

    def setUp(self):
        temporary = tempfile.TemporaryDirectory(prefix="pxeserver-cli-")
        self.addCleanup(temporary.cleanup)
        self.workdir = temporary.name


class TestFlags(_TempDirTestCase):
    """One test per setting flag, named test_<INI key>_flag."""

    def base_argv(self):
        return ["--root", self.workdir, "--iface", IFACE]

    def config_for(self, *flags):
        argv = self.base_argv() + list(flags)
        args = pxeserver.build_parser().parse_args(argv)
        return pxeserver.build_config(args)

    def check_good(self, key, flags, expected):
        """Check that flags give expected as the Config's value of key."""
        config = self.config_for(*flags)
        self.assertEqual(getattr(config, key), expected)

    def check_bad(self, flag, text, named_part=None):
        """Check that flag TEXT makes argparse exit 2 naming flag and text.

        named_part is what the message must name instead of the whole text
        when only part of it is wrong, such as one item of a list.
        """
        code, _, stderr = run_parser(self.base_argv() + [flag, text])
        self.assertEqual(code, 2)
        self.assertIn(f"argument {flag}:", stderr)
        self.assertIn(named_part or text, stderr)

    def test_every_setting_has_flag_test(self):
        for setting in pxeserver.SETTINGS:
            with self.subTest(key=setting.key):
                self.assertTrue(hasattr(self, f"test_{setting.key}_flag"))

    # [server]

    def test_iface_flag(self):
        self.check_good("iface", ["--iface", "eth7"], "eth7")

    def test_root_flag(self):
        root = os.path.join(self.workdir, "boot")
        os.mkdir(root)
        self.check_good("root", ["--root", root], root)

    def test_mode_flag(self):
        self.check_good("mode", ["--mode", "off"], "off")
        self.check_bad("--mode", "relay")

    def test_server_address_flag(self):
        self.check_good("server_address", ["--server-address", "192.0.2.1"],
                        ADDRESS("192.0.2.1"))
        self.check_bad("--server-address", "192.0.2.300")

    def test_log_level_flag(self):
        self.check_good("log_level", ["--log-level", "DEBUG"], "debug")
        self.check_bad("--log-level", "verbose")

    def test_log_timestamps_flag(self):
        self.check_good("log_timestamps", ["--log-timestamps", "no"], False)
        self.check_good("log_timestamps", ["--log-timestamps"], True)
        self.check_bad("--log-timestamps", "maybe")

    # [tftp]

    def test_tftp_address_flag(self):
        self.check_good("tftp_address", ["--tftp-address", LOOPBACK],
                        ADDRESS(LOOPBACK))
        self.check_bad("--tftp-address", "localhost")

    def test_tftp_port_flag(self):
        self.check_good("tftp_port", ["--tftp-port", "6969"], 6969)
        self.check_good("tftp_port", ["--tftp-port", "0"], 0)
        self.check_bad("--tftp-port", "65536")

    def test_log_format_flag(self):
        self.check_good("log_format", ["--log-format", "json"], "json")
        self.check_bad("--log-format", "xml")

    def test_log_file_flag(self):
        self.check_good("log_file", ["--log-file", "-"], "-")

    def test_user_flag(self):
        self.check_good("user", ["--user", "nobody"], "nobody")

    def test_exit_after_flag(self):
        self.check_good("exit_after", ["--exit-after", "3"], 3)
        self.check_bad("--exit-after", "-1")

    def test_exit_after_file_flag(self):
        self.check_good("exit_after_file", ["--exit-after-file", "a.efi"],
                        "a.efi")

    def test_riscv32_efi_file_flag(self):
        self.check_good("riscv32_efi_file", ["--riscv32-efi-file", "r.efi"],
                        "r.efi")

    def test_riscv64_efi_file_flag(self):
        self.check_good("riscv64_efi_file", ["--riscv64-efi-file", "r.efi"],
                        "r.efi")

    def test_uboot_file_flag(self):
        self.check_good("uboot_file", ["--uboot-file", "boot.scr"],
                        "boot.scr")

    def test_http_port_flag(self):
        self.check_good("http_port", ["--http-port", "8080"], 8080)
        self.check_good("http_port", ["--http-port", "0"], 0)
        self.check_bad("--http-port", "65536")

    def test_http_address_flag(self):
        self.check_good("http_address", ["--http-address", LOOPBACK],
                        ADDRESS(LOOPBACK))
        self.check_bad("--http-address", "localhost")

    def test_tftp_port_range_flag(self):
        self.check_good("tftp_port_range",
                        ["--tftp-port-range", "30000-30100"], (30000, 30100))
        self.check_bad("--tftp-port-range", "30100-30000")

    def test_max_blksize_flag(self):
        self.check_good("max_blksize", ["--max-blksize", "1468"], 1468)
        self.check_bad("--max-blksize", "7")

    def test_max_windowsize_flag(self):
        self.check_good("max_windowsize", ["--max-windowsize", "16"], 16)
        self.check_bad("--max-windowsize", "0")

    def test_tftp_timeout_flag(self):
        self.check_good("tftp_timeout", ["--tftp-timeout", "2.5"], 2.5)
        self.check_bad("--tftp-timeout", "0.1")

    def test_tftp_busy_poll_flag(self):
        self.check_good("tftp_busy_poll", ["--tftp-busy-poll", "0"], 0)
        self.check_bad("--tftp-busy-poll", "1001")

    def test_tftp_retries_flag(self):
        self.check_good("tftp_retries", ["--tftp-retries", "3"], 3)
        self.check_bad("--tftp-retries", "0")

    def test_max_transfers_flag(self):
        self.check_good("max_transfers", ["--max-transfers", "10"], 10)
        self.check_bad("--max-transfers", "0")

    def test_upload_dir_flag(self):
        folder = os.path.join(self.workdir, "uploads")
        os.mkdir(folder)
        self.check_good("upload_dir", ["--upload-dir", folder], folder)

    def test_upload_overwrite_flag(self):
        self.check_good("upload_overwrite", ["--upload-overwrite"], True)
        self.check_good("upload_overwrite", ["--upload-overwrite", "no"],
                        False)
        self.check_bad("--upload-overwrite", "sometimes")

    def test_upload_max_bytes_flag(self):
        self.check_good("upload_max_bytes",
                        ["--upload-max-bytes", "1048576"], 1048576)
        self.check_bad("--upload-max-bytes", "-1")

    # [dhcp]

    def test_pool_start_flag(self):
        self.check_good("pool_start",
                        ["--pool-start", "192.0.2.100",
                         "--pool-end", "192.0.2.199"],
                        ADDRESS("192.0.2.100"))
        self.check_bad("--pool-start", "192.0.2")

    def test_pool_end_flag(self):
        self.check_good("pool_end",
                        ["--pool-start", "192.0.2.100",
                         "--pool-end", "192.0.2.199"],
                        ADDRESS("192.0.2.199"))
        self.check_bad("--pool-end", "192.0.2.256")

    def test_router_flag(self):
        self.check_good("router", ["--router", "192.0.2.1"],
                        ADDRESS("192.0.2.1"))
        self.check_bad("--router", "gateway")

    def test_dns_servers_flag(self):
        self.check_good("dns_servers",
                        ["--dns-servers", "192.0.2.53,192.0.2.54"],
                        (ADDRESS("192.0.2.53"), ADDRESS("192.0.2.54")))
        self.check_bad("--dns-servers", "192.0.2.53,dns.example",
                       "'dns.example'")

    def test_domain_name_flag(self):
        self.check_good("domain_name", ["--domain-name", "boot.example"],
                        "boot.example")

    def test_lease_time_flag(self):
        self.check_good("lease_time", ["--lease-time", "7200"], 7200)
        self.check_bad("--lease-time", "59")

    def test_lease_file_flag(self):
        path = os.path.join(self.workdir, "leases.json")
        self.check_good("lease_file", ["--lease-file", path], path)

    def test_known_clients_only_flag(self):
        self.check_good("known_clients_only", ["--known-clients-only"], True)
        self.check_bad("--known-clients-only", "2")

    # [boot]

    def test_bios_file_flag(self):
        self.check_good("bios_file", ["--bios-file", "pxelinux.0"],
                        "pxelinux.0")

    def test_efi32_file_flag(self):
        self.check_good("efi32_file", ["--efi32-file", "i386/boot.efi"],
                        "i386/boot.efi")

    def test_efi64_file_flag(self):
        self.check_good("efi64_file", ["--efi64-file", "snponly.efi"],
                        "snponly.efi")

    def test_arm32_efi_file_flag(self):
        self.check_good("arm32_efi_file", ["--arm32-efi-file", "arm.efi"],
                        "arm.efi")

    def test_arm64_efi_file_flag(self):
        self.check_good("arm64_efi_file", ["--arm64-efi-file", "grub.efi"],
                        "grub.efi")

    def test_fallback_file_flag(self):
        self.check_good("fallback_file", ["--fallback-file", "pxelinux.0"],
                        "pxelinux.0")

    def test_ipxe_script_flag(self):
        self.check_good("ipxe_script", ["--ipxe-script", "menu.ipxe"],
                        "menu.ipxe")
        self.check_good("ipxe_script", ["--ipxe-script", ""], "")


class TestSpecialFlags(_TempDirTestCase):

    def test_tftp_only_equals_mode_off(self):
        base = ["--root", self.workdir]
        parser = pxeserver.build_parser()
        tftp_only = pxeserver.build_config(
            parser.parse_args(base + ["--tftp-only"]))
        mode_off = pxeserver.build_config(
            parser.parse_args(base + ["--mode", "off"]))
        self.assertEqual(tftp_only, mode_off)

    def test_tftp_only_sets_mode_off(self):
        args = pxeserver.build_parser().parse_args(["--tftp-only"])
        self.assertEqual(args.mode, "off")

    def test_version_prints_version(self):
        code, stdout, _ = run_parser(["--version"])
        self.assertEqual(code, 0)
        self.assertIn(pxeserver.__version__, stdout)

    def test_unknown_flag_exits_two(self):
        code, _, stderr = run_parser(["--no-such-flag"])
        self.assertEqual(code, 2)
        self.assertIn("--no-such-flag", stderr)


class TestMainErrors(_TempDirTestCase):

    def run_main(self, argv):
        """Run main(argv) and return (exit status, stderr)."""
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = pxeserver.main(argv)
        return status, stderr.getvalue()

    def test_bad_config_returns_two(self):
        root = os.path.join(self.workdir, "missing")
        status, _ = self.run_main(["--tftp-only", "--root", root])
        self.assertEqual(status, 2)

    def test_bad_config_prints_one_line(self):
        root = os.path.join(self.workdir, "missing")
        _, stderr = self.run_main(["--tftp-only", "--root", root])
        self.assertEqual(stderr.count("\n"), 1)
        self.assertTrue(stderr.startswith("pxeserver.py: error: "))
        self.assertIn(root, stderr)

    def test_bad_ini_value_prints_one_line(self):
        path = os.path.join(self.workdir, "pxe.ini")
        with open(path, "w", encoding="utf-8") as stream:
            stream.write("[tftp]\ntftp_port = 65536\n")
        status, stderr = self.run_main(
            ["--tftp-only", "--root", self.workdir, "--config", path])
        self.assertEqual(status, 2)
        self.assertEqual(stderr.count("\n"), 1)
        self.assertIn("tftp_port: 65536 is out of range", stderr)

    def test_missing_ini_file_prints_one_line(self):
        path = os.path.join(self.workdir, "missing.ini")
        status, stderr = self.run_main(["--config", path])
        self.assertEqual(status, 2)
        self.assertEqual(stderr.count("\n"), 1)
        self.assertIn(path, stderr)


class TestServerProcess(_TempDirTestCase):

    def tftp_only_args(self, port):
        return ["--tftp-only", "--root", self.workdir,
                "--tftp-address", LOOPBACK, "--tftp-port", str(port)]

    def test_server_stops_on_sigterm(self):
        server = PXEServerProcess(self.tftp_only_args(0))
        self.addCleanup(server.stop)
        server.start()
        self.assertEqual(server.stop(), 0)

    def test_ready_line_reports_real_port(self):
        server = PXEServerProcess(self.tftp_only_args(0))
        self.addCleanup(server.stop)
        server.start()
        self.assertIn("ready: mode=off", server.ready_line)
        self.assertEqual(server.tftp_address, LOOPBACK)
        self.assertNotEqual(server.tftp_port, 0)

    def test_taken_port_exits_one(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind((LOOPBACK, 0))
            port = taken.getsockname()[1]
            result = run_command(
                [sys.executable, PXESERVER_PATH]
                + self.tftp_only_args(port), timeout=WAIT_SECONDS)
        lines = result.stderr.splitlines()
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(f"cannot bind TFTP UDP port {port} on {LOOPBACK}",
                      lines[0])
        self.assertEqual(result.stdout, "")

    def test_bad_config_exits_two_without_traceback(self):
        root = os.path.join(self.workdir, "missing")
        result = run_command([sys.executable, PXESERVER_PATH,
                              "--tftp-only", "--root", root])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    unittest.main()
