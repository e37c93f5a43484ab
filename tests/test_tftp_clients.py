"""Real TFTP clients against pxeserver.py over loopback.

Each test class starts one server (--mode off, --tftp-port 0) on a fresh
root directory and fetches files with one client program: tftp-hpa, curl,
busybox or atftp.  Every successful fetch is compared with the served file
by SHA-256.  The clients are real peers: a missing program skips its class,
or fails it when PXESERVER_REQUIRE_PEERS=1.
"""

import os
import re
import shutil
import subprocess
import tempfile
import unittest

from support import WAIT_SECONDS
from support import PXEServerProcess
from support import require_tool
from support import run_command
from support import sha256_file
from support import write_random_file


CLIENT_ADDRESS = "127.0.0.1"

# Served files and their sizes in bytes.  rollover.bin needs more than
# 65535 blocks of 8 bytes, so its block number wraps at blksize 8.
EMPTY_FILE = "empty.bin"
EXACT_512_FILE = "exact-512.bin"
EXACT_1468_FILE = "exact-1468.bin"
ROLLOVER_FILE = "rollover.bin"
LARGE_FILE = "large.bin"
NESTED_FILE = "boot/nested.bin"
TEXT_FILE = "lines.txt"
RANDOM_FILE_SIZES = {
    EMPTY_FILE: 0,
    EXACT_512_FILE: 512 * 8,
    EXACT_1468_FILE: 1468 * 4,
    ROLLOVER_FILE: 8 * 75000,
    LARGE_FILE: 3 * 1024 * 1024 + 12345,
    NESTED_FILE: 1000,
}

# A file beside the root, never served: requests that climb out of the
# root with "../" name it, so a server that follows them would send it.
OUTSIDE_FILE = "outside.bin"
TRAVERSAL_NAMES = ("../outside.bin", "boot/../../outside.bin")
MISSING_NAME = "no-such-file.bin"


def make_text_file(path):
    """Write a LF text file whose line ends fall on many block offsets.

    Lines of varying length put some CR LF pairs of the netascii stream
    across 512-byte DATA blocks.  One line carries a bare CR, which
    netascii sends as CR NUL.
    """
    lines = []
    for number in range(900):
        padding = "x" * (number % 61)
        lines.append(f"line {number} {padding}\n")
    lines.insert(450, "bare\rcarriage return\n")
    with open(path, "w", encoding="ascii", newline="") as stream:
        stream.write("".join(lines))


class _ClientTestCase(unittest.TestCase):
    """One server on a prepared root, shared by the tests of a subclass.

    Subclasses set tool_names to the programs they run.  Python 3.6 has no
    addClassCleanup, so setUpClass cleans up itself when it fails.
    """

    tool_names = ()

    @classmethod
    def setUpClass(cls):
        require_tool(None, *cls.tool_names)
        cls.workdir = tempfile.mkdtemp(prefix="pxeserver-tftp-clients-")
        try:
            cls._prepare_root()
            cls.server = PXEServerProcess([
                "--root", cls.root,
                "--mode", "off",
                "--tftp-address", CLIENT_ADDRESS,
                "--tftp-port", "0",
            ])
            cls.server.start()
        except BaseException:
            cls._remove_workdir()
            raise
        if cls.server.tftp_port is None:
            cls.server.stop()
            cls._remove_workdir()
            raise AssertionError(
                f"ready line has no tftp=ADDR:PORT: {cls.server.ready_line!r}"
            )

    @classmethod
    def tearDownClass(cls):
        status = cls.server.stop()
        cls._remove_workdir()
        if status != 0:
            raise AssertionError(
                f"pxeserver exited with status {status} after SIGTERM, "
                f"expected 0; log:\n{cls.server.log_text()}"
            )

    @classmethod
    def _prepare_root(cls):
        cls.root = os.path.join(cls.workdir, "root")
        os.makedirs(os.path.join(cls.root, "boot"))
        cls.sizes = {}
        cls.digests = {}
        for seed, (name, size) in enumerate(RANDOM_FILE_SIZES.items()):
            path = os.path.join(cls.root, name)
            write_random_file(path, size, seed)
            cls.sizes[name] = size
            cls.digests[name] = sha256_file(path)
        text_path = os.path.join(cls.root, TEXT_FILE)
        make_text_file(text_path)
        cls.digests[TEXT_FILE] = sha256_file(text_path)
        outside_path = os.path.join(cls.workdir, OUTSIDE_FILE)
        write_random_file(outside_path, 2000, seed=99)
        cls.outside_digest = sha256_file(outside_path)

    @classmethod
    def _remove_workdir(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self):
        self.outdir = tempfile.mkdtemp(dir=self.workdir, prefix="fetched-")
        self.log_start = self.server.log_mark()

    def output_path(self, name):
        """Return a fresh local path for fetching the served name."""
        return os.path.join(self.outdir, name.replace("/", "_"))

    def run_client(self, args):
        try:
            return run_command(args)
        except subprocess.TimeoutExpired:
            self.fail(f"client timed out after {WAIT_SECONDS} s: {args}")

    def assert_client_succeeded(self, result):
        self.assertEqual(
            result.returncode, 0,
            f"{result.args} exited with {result.returncode}; "
            f"stdout: {result.stdout!r} stderr: {result.stderr!r}\n"
            f"server log:\n"
            f"{self.server.log_text()}",
        )

    def assert_same_content(self, name, path):
        self.assertTrue(os.path.exists(path), f"{path} was not written")
        self.assertEqual(
            sha256_file(path), self.digests[name],
            f"fetched {name} differs from the served file",
        )

    def assert_not_outside_file(self, path):
        if os.path.exists(path):
            self.assertNotEqual(
                sha256_file(path), self.outside_digest,
                "server sent the file outside the root",
            )

    def assert_sent_logged(self, name):
        """Check that the server's transfer line for name gives its size."""
        line = self.server.wait_for_log(
            f"sent {name} to {CLIENT_ADDRESS}:", since=self.log_start
        )
        self.assertRegex(line, rf" bytes={self.sizes[name]}(\s|$)")


class TestTFTPHPAClient(_ClientTestCase):
    """tftp-hpa's tftp, which sends no options (blksize 512, no tsize).

    It exits with status 0 even when the server replies with a TFTP error.
    tftp-hpa 5.2 prints the error as "Error code N: MESSAGE" on stdout,
    not stderr, so the tests search both streams.
    """

    tool_names = ("tftp",)

    def fetch(self, name, mode="binary"):
        path = self.output_path(name)
        result = self.run_client([
            "tftp", "-m", mode, CLIENT_ADDRESS, str(self.server.tftp_port),
            "-c", "get", name, path,
        ])
        return result, path

    @staticmethod
    def client_output(result):
        return result.stdout + result.stderr

    def assert_fetched(self, name, mode="binary"):
        result, path = self.fetch(name, mode)
        self.assert_client_succeeded(result)
        self.assertNotIn("Error code", self.client_output(result))
        self.assert_same_content(name, path)

    def test_fetches_large_random_file(self):
        self.assert_fetched(LARGE_FILE)
        self.assert_sent_logged(LARGE_FILE)

    def test_fetches_empty_file(self):
        self.assert_fetched(EMPTY_FILE)
        self.assert_sent_logged(EMPTY_FILE)

    def test_fetches_exact_block_multiple(self):
        self.assert_fetched(EXACT_512_FILE)
        self.assert_sent_logged(EXACT_512_FILE)

    def test_fetches_file_in_subdirectory(self):
        self.assert_fetched(NESTED_FILE)

    def test_netascii_returns_original_text(self):
        # The client turns the server's CR LF and CR NUL back into LF
        # and CR, so a correct netascii stream yields the original file.
        self.assert_fetched(TEXT_FILE, mode="ascii")

    def test_missing_file_reports_error_code(self):
        result, path = self.fetch(MISSING_NAME)
        self.assertIn("Error code 1", self.client_output(result))

    def test_parent_traversal_reports_error_code(self):
        for name in TRAVERSAL_NAMES:
            with self.subTest(name=name):
                result, path = self.fetch(name)
                # RFC 1350 error 2 is "Access violation".
                self.assertIn("Error code 2", self.client_output(result))
                self.assert_not_outside_file(path)


class TestCurlClient(_ClientTestCase):
    """curl's tftp:// support, which sends tsize and blksize by default."""

    tool_names = ("curl",)

    def curl_args(self, name, path, *options):
        url = f"tftp://{CLIENT_ADDRESS}:{self.server.tftp_port}/{name}"
        return [
            "curl", "--silent", "--show-error",
            "--max-time", str(WAIT_SECONDS), *options, "-o", path, url,
        ]

    def fetch(self, name, *options):
        path = self.output_path(name)
        return self.run_client(self.curl_args(name, path, *options)), path

    def assert_fetched(self, name, *options):
        result, path = self.fetch(name, *options)
        self.assert_client_succeeded(result)
        self.assert_same_content(name, path)

    def test_default_blksize_large_file(self):
        self.assert_fetched(LARGE_FILE)
        self.assert_sent_logged(LARGE_FILE)

    def test_blksize_8_rolls_block_number(self):
        self.assert_fetched(ROLLOVER_FILE, "--tftp-blksize", "8")
        self.assert_sent_logged(ROLLOVER_FILE)

    def test_blksize_1468_large_file(self):
        self.assert_fetched(LARGE_FILE, "--tftp-blksize", "1468")
        self.assert_sent_logged(LARGE_FILE)

    def test_blksize_65464_large_file(self):
        self.assert_fetched(LARGE_FILE, "--tftp-blksize", "65464")
        self.assert_sent_logged(LARGE_FILE)

    def test_blksize_1468_exact_multiple(self):
        self.assert_fetched(EXACT_1468_FILE, "--tftp-blksize", "1468")
        self.assert_sent_logged(EXACT_1468_FILE)

    def test_default_blksize_exact_multiple(self):
        self.assert_fetched(EXACT_512_FILE)

    def test_empty_file_without_options(self):
        # curl 7.88 rejects an OACK carrying tsize 0, so an empty file is
        # fetched without options, as a plain RFC 1350 client would.
        self.assert_fetched(EMPTY_FILE, "--tftp-no-options")
        self.assert_sent_logged(EMPTY_FILE)

    def test_missing_file_exits_not_found(self):
        result, path = self.fetch(MISSING_NAME)
        # 68 is CURLE_TFTP_NOTFOUND: the server sent TFTP error 1.
        self.assertEqual(result.returncode, 68, result.stderr)

    def test_parent_traversal_exits_with_error(self):
        for name in TRAVERSAL_NAMES:
            with self.subTest(name=name):
                # Without --path-as-is curl removes the dot segments from
                # the URL and requests "outside.bin" instead.
                result, path = self.fetch(name, "--path-as-is")
                # 69 is CURLE_TFTP_PERM: the server sent TFTP error 2
                # (access violation).
                self.assertEqual(result.returncode, 69, result.stderr)
                self.assert_not_outside_file(path)

    def test_parallel_fetches_match_file(self):
        paths = [self.output_path(f"copy{index}") for index in range(4)]
        clients = [
            subprocess.Popen(
                self.curl_args(LARGE_FILE, path, "--tftp-blksize", "1468"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for path in paths
        ]
        for client in clients:
            self.addCleanup(client.wait)
            self.addCleanup(client.kill)
        for client in clients:
            self.assertEqual(client.wait(WAIT_SECONDS), 0, client.args)
        for path in paths:
            self.assert_same_content(LARGE_FILE, path)


class TestBusyboxClient(_ClientTestCase):
    """BusyBox tftp, which sends tsize and, with -b, blksize."""

    tool_names = ("busybox",)

    def fetch(self, name, *options):
        path = self.output_path(name)
        result = self.run_client([
            "busybox", "tftp", *options, "-g", "-r", name, "-l", path,
            CLIENT_ADDRESS, str(self.server.tftp_port),
        ])
        return result, path

    def assert_fetched(self, name, *options):
        result, path = self.fetch(name, *options)
        self.assert_client_succeeded(result)
        self.assert_same_content(name, path)

    def test_default_blksize_large_file(self):
        self.assert_fetched(LARGE_FILE)
        self.assert_sent_logged(LARGE_FILE)

    def test_blksize_1468_large_file(self):
        self.assert_fetched(LARGE_FILE, "-b", "1468")
        self.assert_sent_logged(LARGE_FILE)

    def test_blksize_1468_exact_multiple(self):
        self.assert_fetched(EXACT_1468_FILE, "-b", "1468")

    def test_fetches_empty_file(self):
        self.assert_fetched(EMPTY_FILE)

    def test_missing_file_exits_with_error(self):
        result, path = self.fetch(MISSING_NAME)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("server error: (1)", result.stderr)

    def test_parent_traversal_exits_with_error(self):
        for name in TRAVERSAL_NAMES:
            with self.subTest(name=name):
                result, path = self.fetch(name)
                self.assertNotEqual(result.returncode, 0)
                self.assertIn("server error: (2)", result.stderr)
                self.assert_not_outside_file(path)


class TestATFTPClient(_ClientTestCase):
    """atftp with explicit RFC 2348, 2349 and 7440 options.

    --trace prints the OACK as "received OACK <name: value, ...>", which
    shows what the server accepted.
    """

    tool_names = ("atftp",)

    def fetch(self, name, *options):
        path = self.output_path(name)
        option_args = []
        for option in options:
            option_args += ["--option", option]
        result = self.run_client([
            "atftp", "--trace", *option_args, "-g", "-r", name, "-l", path,
            CLIENT_ADDRESS, str(self.server.tftp_port),
        ])
        return result, path

    def fetch_and_read_oack(self, name, *options):
        """Fetch name, check its content and return the OACK trace line."""
        result, path = self.fetch(name, *options)
        self.assert_client_succeeded(result)
        self.assert_same_content(name, path)
        output = result.stdout + result.stderr
        match = re.search(r"^received OACK <.*>$", output, re.MULTILINE)
        self.assertIsNotNone(match, f"no OACK in atftp trace:\n{output}")
        return match.group(0)

    def test_blksize_1468_large_file(self):
        oack = self.fetch_and_read_oack(LARGE_FILE, "blksize 1468")
        self.assertIn("blksize: 1468,", oack)
        self.assert_sent_logged(LARGE_FILE)

    def test_tsize_reports_file_size(self):
        oack = self.fetch_and_read_oack(LARGE_FILE, "tsize 0")
        self.assertIn(f"tsize: {self.sizes[LARGE_FILE]},", oack)

    def test_tsize_of_empty_file(self):
        oack = self.fetch_and_read_oack(EMPTY_FILE, "tsize 0")
        self.assertIn("tsize: 0,", oack)

    def test_windowsize_16_large_file(self):
        oack = self.fetch_and_read_oack(
            LARGE_FILE, "blksize 1468", "windowsize 16"
        )
        self.assertIn("windowsize: 16,", oack)
        self.assert_sent_logged(LARGE_FILE)

    def test_all_options_exact_multiple(self):
        oack = self.fetch_and_read_oack(
            EXACT_1468_FILE, "tsize 0", "blksize 1468", "windowsize 16"
        )
        self.assertIn(f"tsize: {self.sizes[EXACT_1468_FILE]},", oack)

    def test_missing_file_exits_with_error(self):
        result, path = self.fetch(MISSING_NAME)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("error received from server", result.stderr)

    def test_parent_traversal_exits_with_error(self):
        for name in TRAVERSAL_NAMES:
            with self.subTest(name=name):
                result, path = self.fetch(name)
                self.assertNotEqual(result.returncode, 0)
                self.assertIn("error received from server", result.stderr)
                self.assert_not_outside_file(path)


if __name__ == "__main__":
    unittest.main()
