"""Operations features of pxeserver.py, tested on a real child process.

SIGHUP reload, SIGTERM, --user, --log-format json and --log-file,
--exit-after and --exit-after-file, and --check.  Each server runs as a
subprocess in TFTP-only mode on 127.0.0.1 with port 0, and curl's tftp://
support is the client.  The only DHCP-capable run is --check in full mode,
which binds and releases port 67 without sending anything, inside a
network namespace that the test creates and deletes.
"""

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import support


# Upper bound on every wait in this module, as in support.py.
WAIT_SECONDS = support.WAIT_SECONDS

# A server that gets SIGTERM must exit within this many seconds, also while
# a transfer runs.  The figure is an estimate: its main loop wakes every
# 0.5 s, and on loopback it exits in under 1 s.
STOP_BOUND_SECONDS = 10

# Interval of the bounded polls on a log file and on /proc.
POLL_SECONDS = 0.05

BOOT_FILE = "undionly.kpxe"
OTHER_FILE = "other.bin"
NEW_BOOT_FILE = "new.kpxe"
SLOW_FILE = "slow.bin"
# 2 MB in 8-byte blocks is 250,000 lock-step round trips: about 2 s on
# loopback, long enough to send a signal while the transfer runs.
SLOW_FILE_SIZE = 2_000_000
SLOW_BLKSIZE = 8

SECOND_CLIENT_ADDRESS = "127.0.0.2"
NOBODY_UID = 65534

# Exit status for an invalid setting, such as an unknown --user or an
# unwritable --log-file, as the README's Operations section documents.
CONFIG_ERROR_STATUS = 2


def _loopback_args(root, *extra):
    return ["--tftp-only", "--tftp-address", "127.0.0.1", "--tftp-port",
            "0", "--root", root, *extra]


def _write_ini(path, sections):
    parser = configparser.ConfigParser()
    parser.read_dict(sections)
    with open(path, "w", encoding="utf-8") as stream:
        parser.write(stream)


class _ServerTestCase(unittest.TestCase):
    """Temporary root with a boot file, a second file and a slow file."""

    def setUp(self):
        support.require_tool(self, "curl")
        temp = tempfile.TemporaryDirectory(prefix="pxeops-")
        self.addCleanup(temp.cleanup)
        self.tempdir = temp.name
        self.root = os.path.join(self.tempdir, "root")
        os.mkdir(self.root)
        for name in (BOOT_FILE, OTHER_FILE, NEW_BOOT_FILE):
            with open(os.path.join(self.root, name), "wb") as stream:
                stream.write(name.encode() * 100)
        self.downloads = 0

    def start_server(self, *args, log_path=None, prefix=()):
        server = support.PXEServerProcess(args, prefix=prefix,
                                          log_path=log_path)
        self.addCleanup(server.stop)
        server.start()
        return server

    def slow_file(self):
        path = os.path.join(self.root, SLOW_FILE)
        if not os.path.exists(path):
            support.write_random_file(path, SLOW_FILE_SIZE)
        return path

    def curl_args(self, port, name, output, *options):
        return ["curl", "--silent", "--show-error", "--max-time",
                str(WAIT_SECONDS), *options, "--output", output,
                f"tftp://127.0.0.1:{port}/{name}"]

    def fetch(self, port, name, *options):
        """Download name with curl and return the local copy's path."""
        self.downloads += 1
        output = os.path.join(self.tempdir, f"fetch{self.downloads}")
        result = support.run_command(
            self.curl_args(port, name, output, *options))
        self.assertEqual(result.returncode, 0,
                         f"curl {name} failed: {result.stderr}")
        return output

    def start_slow_fetch(self, port):
        """Start a blksize 8 download of the slow file with curl.

        Returns the curl process and the path of the local copy.
        """
        output = os.path.join(self.tempdir, "slow.out")
        process = subprocess.Popen(
            self.curl_args(port, SLOW_FILE, output, "--tftp-blksize",
                           str(SLOW_BLKSIZE)),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.addCleanup(self._reap, process)
        return process, output

    @staticmethod
    def _reap(process):
        if process.poll() is None:
            process.kill()
        process.wait(WAIT_SECONDS)
        process.stderr.close()

    def run_pxeserver(self, *args, prefix=()):
        command = [*prefix, sys.executable, support.PXESERVER_PATH, *args]
        return support.run_command(command)


class TestReload(_ServerTestCase):

    def setUp(self):
        super().setUp()
        self.ini = os.path.join(self.tempdir, "pxe.ini")
        self.sections = {
            "server": {"root": self.root, "mode": "off"},
            "tftp": {"tftp_address": "127.0.0.1", "tftp_port": "0"},
            "boot": {"bios_file": BOOT_FILE},
        }
        _write_ini(self.ini, self.sections)

    def start_with_config(self):
        return self.start_server("--config", self.ini)

    def test_sighup_reloads_changed_bios_file(self):
        server = self.start_with_config()
        self.sections["boot"]["bios_file"] = NEW_BOOT_FILE
        _write_ini(self.ini, self.sections)
        server.process.send_signal(signal.SIGHUP)
        line = server.wait_for_log(f"reloaded {self.ini}")
        self.assertIn("changed bios_file", line)

    def test_sighup_rejects_broken_ini_file(self):
        server = self.start_with_config()
        with open(self.ini, "w", encoding="utf-8") as stream:
            stream.write("[tftp\ntftp_port = not a port\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(f"reload of {self.ini} rejected")
        copy = self.fetch(server.tftp_port, BOOT_FILE)
        self.assertEqual(support.sha256_file(copy), support.sha256_file(
            os.path.join(self.root, BOOT_FILE)))

    def test_sighup_warns_restart_only_key(self):
        server = self.start_with_config()
        new_port = server.tftp_port + 1 if server.tftp_port < 65535 else 1
        self.sections["tftp"]["tftp_port"] = str(new_port)
        _write_ini(self.ini, self.sections)
        server.process.send_signal(signal.SIGHUP)
        line = server.wait_for_log("needs a restart")
        self.assertIn("tftp_port", line)
        server.wait_for_log(f"reloaded {self.ini}: changed nothing")
        self.fetch(server.tftp_port, BOOT_FILE)

    def test_sighup_without_config_reloads_nothing(self):
        server = self.start_server(*_loopback_args(self.root))
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("nothing to reload")
        self.assertIsNone(server.process.poll())

    def test_sighup_keeps_running_transfer(self):
        server = self.start_with_config()
        source = self.slow_file()
        mark = server.log_mark()
        client, output = self.start_slow_fetch(server.tftp_port)
        server.wait_for_log(f"file={SLOW_FILE}", since=mark)
        self.sections["boot"]["bios_file"] = NEW_BOOT_FILE
        _write_ini(self.ini, self.sections)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(f"reloaded {self.ini}")
        self.assertIsNone(client.poll(), "transfer ended before SIGHUP; "
                          "the test file is too small to prove anything")
        self.assertEqual(client.wait(WAIT_SECONDS), 0,
                         client.stderr.read().decode(errors="replace"))
        self.assertEqual(support.sha256_file(output),
                         support.sha256_file(source))


class TestStop(_ServerTestCase):

    def test_sigterm_exits_zero_logs_stopped(self):
        server = self.start_server(*_loopback_args(self.root))
        self.assertEqual(server.stop(), 0)
        self.assertIn(" stopped", server.log_text())

    def test_sigterm_during_transfer_exits_promptly(self):
        server = self.start_server(*_loopback_args(self.root))
        self.slow_file()
        mark = server.log_mark()
        client, _ = self.start_slow_fetch(server.tftp_port)
        server.wait_for_log(f"file={SLOW_FILE}", since=mark)
        self.assertIsNone(client.poll(), "transfer ended before SIGTERM")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.wait_for_exit(STOP_BOUND_SECONDS)
        elapsed = time.monotonic() - started
        self.assertEqual(status, 0)
        self.assertLess(elapsed, STOP_BOUND_SECONDS)

    def test_sigterm_right_after_sighup_stops(self):
        server = self.start_server(*_loopback_args(self.root))
        # While the server is stopped both signals stay pending, so they
        # reach it together when SIGCONT resumes it.
        server.process.send_signal(signal.SIGSTOP)
        server.process.send_signal(signal.SIGHUP)
        server.process.send_signal(signal.SIGTERM)
        server.process.send_signal(signal.SIGCONT)
        self.assertEqual(server.wait_for_exit(STOP_BOUND_SECONDS), 0)


def _proc_uids(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith("Uid:"):
                return [int(field) for field in line.split()[1:]]
    raise AssertionError(f"no Uid line in /proc/{pid}/status")


class TestUser(_ServerTestCase):

    def test_user_nobody_switches_and_serves(self):
        support.require_root(self)
        os.chmod(self.tempdir, 0o755)
        server = self.start_server(*_loopback_args(self.root),
                                   "--user", "nobody")
        line = server.wait_for_log("switched to user nobody")
        self.assertIn(f"uid {NOBODY_UID}", line)
        self.assertEqual(_proc_uids(server.process.pid), [NOBODY_UID] * 4)
        copy = self.fetch(server.tftp_port, BOOT_FILE)
        self.assertEqual(support.sha256_file(copy), support.sha256_file(
            os.path.join(self.root, BOOT_FILE)))

    def test_unknown_user_exits_with_one_line(self):
        result = self.run_pxeserver(*_loopback_args(self.root),
                                    "--user", "no-such-user")
        self.assertEqual(result.returncode, CONFIG_ERROR_STATUS)
        lines = (result.stdout + result.stderr).splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("no-such-user", lines[0])


class TestLogOutput(_ServerTestCase):

    def test_json_lines_have_base_fields(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--log-format", "json")
        self.fetch(server.tftp_port, BOOT_FILE)
        server.wait_for_log("transfer_end")
        self.assertEqual(server.stop(), 0)
        lines = server.log_text().splitlines()
        self.assertGreaterEqual(len(lines), 4, lines)
        for line in lines:
            with self.subTest(line=line):
                entry = json.loads(line)
                for key in ("time", "level", "logger", "message"):
                    self.assertIn(key, entry)

    def test_json_download_logs_transfer_events(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--log-format", "json")
        self.fetch(server.tftp_port, BOOT_FILE)
        server.wait_for_log('"transfer_end"')
        entries = [json.loads(line)
                   for line in server.log_text().splitlines()]
        events = {entry.get("event"): entry for entry in entries}
        size = os.path.getsize(os.path.join(self.root, BOOT_FILE))
        for name in ("transfer_start", "transfer_end"):
            with self.subTest(event=name):
                self.assertIn(name, events)
                self.assertEqual(events[name]["file"], BOOT_FILE)
                self.assertTrue(
                    events[name]["client"].startswith("127.0.0.1:"))
        self.assertEqual(events["transfer_start"]["size"], size)
        self.assertEqual(events["transfer_end"]["bytes"], size)

    def test_log_file_dash_writes_stdout(self):
        stderr_path = os.path.join(self.tempdir, "stderr.txt")
        # The shell sends stderr to a file, so the ready line that
        # PXEServerProcess waits for can only come from stdout.
        prefix = ["sh", "-c", f'exec "$@" 2>"{stderr_path}"', "sh"]
        self.start_server(*_loopback_args(self.root), "--log-file", "-",
                          prefix=prefix)
        self.assertEqual(os.path.getsize(stderr_path), 0)

    def test_log_file_path_receives_log(self):
        log_path = os.path.join(self.tempdir, "server.log")
        server = support.PXEServerProcess(
            _loopback_args(self.root, "--log-file", log_path))
        self.addCleanup(server.stop)
        server.start(wait_ready=False)
        ready = _wait_for_file_line(log_path, "ready: mode=off")
        port = int(ready.rsplit("tftp=127.0.0.1:", 1)[1].split()[0])
        self.fetch(port, BOOT_FILE)
        _wait_for_file_line(log_path, f"sent {BOOT_FILE}")
        self.assertEqual(server.stop(), 0)
        self.assertEqual(server.log_text(), "")

    def test_unwritable_log_file_exits_with_error(self):
        log_path = os.path.join(self.tempdir, "missing-dir", "server.log")
        result = self.run_pxeserver(*_loopback_args(self.root),
                                    "--log-file", log_path)
        self.assertEqual(result.returncode, CONFIG_ERROR_STATUS)
        lines = (result.stdout + result.stderr).splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(log_path, lines[0])


def _wait_for_file_line(path, text):
    """Return the first line of the file at path that contains text.

    Polls the file, and raises AssertionError when no such line appears
    within WAIT_SECONDS.
    """
    deadline = time.monotonic() + WAIT_SECONDS
    content = ""
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as stream:
                content = stream.read()
            for line in content.splitlines():
                if text in line:
                    return line
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"no line containing {text!r} in {path} after "
                         f"{WAIT_SECONDS} s; content:\n{content}")


class TestExitAfter(_ServerTestCase):

    def assert_exit_follows(self, server, text):
        """Assert the server exits 0 and logs exit_after after text."""
        self.assertEqual(server.wait_for_exit(), 0)
        lines = server.log_text().splitlines()
        trigger = [i for i, line in enumerate(lines) if text in line]
        reached = [i for i, line in enumerate(lines)
                   if "exit_after=" in line and "reached" in line]
        self.assertTrue(trigger, f"no line with {text!r}: {lines}")
        self.assertTrue(reached, f"no exit_after line: {lines}")
        self.assertGreater(reached[0], trigger[0], lines)

    def test_exit_after_one_boot_download(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--bios-file", BOOT_FILE,
                                   "--exit-after", "1")
        self.fetch(server.tftp_port, BOOT_FILE)
        self.assert_exit_follows(server, f"sent {BOOT_FILE}")

    def test_exit_after_ignores_other_file(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--bios-file", BOOT_FILE,
                                   "--exit-after", "1")
        self.fetch(server.tftp_port, OTHER_FILE)
        self.fetch(server.tftp_port, BOOT_FILE)
        self.assert_exit_follows(server, f"sent {BOOT_FILE}")

    def test_exit_after_file_counts_only_it(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--bios-file", BOOT_FILE,
                                   "--exit-after", "1",
                                   "--exit-after-file", OTHER_FILE)
        self.fetch(server.tftp_port, BOOT_FILE)
        self.fetch(server.tftp_port, OTHER_FILE)
        self.assert_exit_follows(server, f"sent {OTHER_FILE}")

    def test_exit_after_two_needs_two_clients(self):
        server = self.start_server(*_loopback_args(self.root),
                                   "--bios-file", BOOT_FILE,
                                   "--exit-after", "2")
        self.fetch(server.tftp_port, BOOT_FILE)
        self.fetch(server.tftp_port, BOOT_FILE)
        self.fetch(server.tftp_port, BOOT_FILE,
                   "--interface", SECOND_CLIENT_ADDRESS)
        self.assert_exit_follows(
            server, f"sent {BOOT_FILE} to {SECOND_CLIENT_ADDRESS}:")


class TestOpenFileLimit(_ServerTestCase):
    """Each transfer holds three descriptors: its socket, the guard beside
    it and the file.  At start-up the soft limit is raised to what
    --max-transfers needs, up to the hard limit."""

    def open_file_limits(self, server):
        with open(f"/proc/{server.process.pid}/limits") as stream:
            for line in stream:
                if line.startswith("Max open files"):
                    return [int(field) for field in line.split()[3:5]]
        raise AssertionError("no open file limit in /proc")

    def test_soft_limit_raised_for_max_transfers(self):
        server = self.start_server(
            *_loopback_args(self.root, "--max-transfers", "300"),
            prefix=("prlimit", "--nofile=256:4096"))
        soft, hard = self.open_file_limits(server)
        self.assertGreaterEqual(soft, 300 * 3)
        self.assertEqual(hard, 4096)
        self.assertNotIn("open file limit", server.log_text())
        self.fetch(server.tftp_port, BOOT_FILE)

    def test_low_hard_limit_warns_and_serves(self):
        server = self.start_server(
            *_loopback_args(self.root, "--max-transfers", "300"),
            prefix=("prlimit", "--nofile=256:400"))
        line = server.wait_for_log("open file limit")
        # 400 descriptors, less 64 spare, at 3 per transfer.
        self.assertIn("(400) allows about 112 TFTP transfers", line)
        self.assertIn("max_transfers=300", line)
        self.assertEqual(self.open_file_limits(server), [400, 400])
        copy = self.fetch(server.tftp_port, BOOT_FILE)
        with open(copy, "rb") as stream:
            self.assertEqual(stream.read(), BOOT_FILE.encode() * 100)


class TestCheck(_ServerTestCase):

    def test_check_passes_tftp_only_config(self):
        result = self.run_pxeserver(*_loopback_args(self.root), "--check")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("check: ok", result.stdout.splitlines())

    def test_check_reports_port_in_use(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            args = _loopback_args(self.root)
            args[args.index("--tftp-port") + 1] = str(port)
            result = self.run_pxeserver(*args, "--check")
        self.assertEqual(result.returncode, 1, result.stdout)
        problems = [line for line in result.stdout.splitlines()
                    if line.startswith("problem:")]
        self.assertEqual(len(problems), 1, result.stdout)
        self.assertIn(str(port), problems[0])

    def make_namespace_with_iface(self, iface):
        """Create a namespace with iface up at 192.0.2.1/24; return it.

        iface is one end of a veth pair whose other end stays in the same
        namespace, so nothing reaches the default namespace.
        """
        support.require_tool(self, "ip")
        support.require_root(self)
        namespace = f"pxops{os.getpid()}"
        self.addCleanup(support.run_command,
                        ["ip", "netns", "delete", namespace])
        for command in (
                ["ip", "netns", "add", namespace],
                ["ip", "-n", namespace, "link", "add", iface,
                 "type", "veth", "peer", "name", f"{iface}p"],
                ["ip", "-n", namespace, "address", "add", "192.0.2.1/24",
                 "dev", iface],
                ["ip", "-n", namespace, "link", "set", iface, "up"]):
            result = support.run_command(command)
            self.assertEqual(result.returncode, 0,
                             f"{command}: {result.stderr}")
        return namespace

    def check_full_mode(self, *extra):
        """Run --check in full mode on a namespace's veth end.

        The root lacks BOOT_FILE and every other default boot file.
        """
        iface = "pxops0"
        namespace = self.make_namespace_with_iface(iface)
        os.remove(os.path.join(self.root, BOOT_FILE))
        lease_file = os.path.join(self.tempdir, "leases.json")
        return self.run_pxeserver(
            "--mode", "full", "--iface", iface, "--root", self.root,
            "--tftp-port", "0", "--lease-file", lease_file, *extra,
            "--check", prefix=["ip", "netns", "exec", namespace])

    def test_check_notes_missing_default_file(self):
        result = self.check_full_mode()
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn(f"note: default boot file '{BOOT_FILE}' not found",
                      result.stdout)

    def test_check_lists_missing_boot_file(self):
        result = self.check_full_mode("--bios-file", BOOT_FILE)
        self.assertEqual(result.returncode, 1, result.stdout)
        problems = [line for line in result.stdout.splitlines()
                    if line.startswith("problem:")]
        self.assertTrue(
            any(f"boot file '{BOOT_FILE}' not found" in line
                for line in problems), result.stdout)
        self.assertIn(f"check: {len(problems)} problems",
                      result.stdout.splitlines())


if __name__ == "__main__":
    unittest.main()
