#!/usr/bin/env python3
"""Benchmark HTTP downloads from pxeserver against python3 -m http.server.

Run as root from the repository, by hand (it is not a unittest)::

    python3 tests/benchmarks/bench_http.py

One run fetches the same 64 MiB random file with curl in three ways:

- over HTTP from pxeserver (--http-port, which sends with sendfile());
- over HTTP from `python3 -m http.server` of the same interpreter, which
  copies the file through user space;
- over TFTP from the same pxeserver process, lock-step with
  `curl --tftp-blksize 1468`, the block size that fills a 1500-byte MTU.

The link is one veth pair between a server namespace (198.51.100.1/24)
and a client namespace (198.51.100.2/24), both created by the script
through tests/netns.py and removed on exit.  The servers are pinned with
taskset to vCPU 0.  curl runs on the same vCPU ("same", which measures
CPU cost) and on the other one ("cross", bound by wake-up latency, as a
LAN is).  The order of the three fetches reverses from one run to the
next.  The summary prints, per case, the median MB/s over the runs (10^6
bytes per second, from curl's own time_total, which leaves out process
start-up) and the mean server CPU time per fetch.  It ends with the
ratios of the median MB/s.

Every fetch is checked by SHA-256.  Exit status: 0 when every fetch
succeeded, 1 when one failed, 2 when the benchmark could not run.
"""

import argparse
import hashlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)

import netns  # noqa: E402  (needs the path above)


PXESERVER_PATH = os.path.join(os.path.dirname(TESTS_DIR), "pxeserver.py")

FILE_NAME = "large.bin"
FILE_BYTES = 64 << 20
BLKSIZE = 1468  # 1468 + 4 (TFTP) + 8 (UDP) + 20 (IPv4) = MTU 1500
DEFAULT_RUNS = 5
MEGABYTE = 10 ** 6

SERVER_ADDRESS = "198.51.100.1"
CLIENT_ADDRESS = "198.51.100.2"
PREFIX_LENGTH = 24
LINK_MTU = 1500
# The namespaces are created by this script, so these ports are free.
TFTP_PORT = 69
PXESERVER_HTTP_PORT = 8080
HTTP_SERVER_PORT = 8081

SERVER_CPU = 0
CLIENT_CPUS = {"same": 0, "cross": 1}

# Bounds on every wait, far above what a healthy run needs: a 64 MiB
# lock-step TFTP fetch took 2 to 7 s on a 2-vCPU VM, and HTTP under 1 s.
COMMAND_TIMEOUT_SECONDS = 60
STARTUP_TIMEOUT_SECONDS = 15
FETCH_TIMEOUT_SECONDS = 120
POLL_SECONDS = 0.02

# (label, server, protocol) in the order of even-numbered runs.
CASES = (
    ("HTTP, pxeserver", "pxeserver", "http"),
    ("HTTP, http.server", "http.server", "http"),
    ("TFTP, pxeserver", "pxeserver", "tftp"),
)


class BenchmarkError(Exception):
    """The benchmark cannot go on; the message states why."""


class FetchError(BenchmarkError):
    """A fetch failed, timed out or wrote the wrong bytes."""


def run_command(argv, timeout=COMMAND_TIMEOUT_SECONDS):
    """Run argv to completion and return its output; raise on failure."""
    result = subprocess.run(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout)
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)!r} failed with status "
                             f"{result.returncode}: {output.strip()}")
    return output


def pinned(cpu, argv):
    return ["taskset", "--cpu-list", str(cpu), *argv]


# ---------------------------------------------------------------------------
# Link and servers
# ---------------------------------------------------------------------------


def build_link(lab):
    """Join the lab's server namespace to a new client namespace.

    Returns the client namespace.  The lab's own bridge stays unused: the
    pair is direct, so every byte crosses exactly one veth pair.
    """
    client_ns = lab.add_namespace("hc")
    server_end = f"{lab.prefix}hs"
    client_end = f"{lab.prefix}hc"
    run_command(["ip", "-n", lab.server_ns, "link", "add", server_end,
                 "mtu", str(LINK_MTU), "type", "veth", "peer", "name",
                 client_end, "netns", client_ns])
    run_command(["ip", "-n", client_ns, "link", "set", client_end,
                 "mtu", str(LINK_MTU)])
    for namespace, device, address in (
            (lab.server_ns, server_end, SERVER_ADDRESS),
            (client_ns, client_end, CLIENT_ADDRESS)):
        run_command(["ip", "-n", namespace, "address", "add",
                     f"{address}/{PREFIX_LENGTH}", "dev", device])
        run_command(["ip", "-n", namespace, "link", "set", device, "up"])
    return client_ns


class Server:
    """A server process in the lab's server namespace, pinned to SERVER_CPU.

    Its output goes to a log file, never through a pipe to this process,
    so no reader competes with the pinned processes for a vCPU.
    """

    def __init__(self, lab, name, argv, log_path, cwd=None):
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = lab.popen(
                lab.server_ns, pinned(SERVER_CPU, argv),
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=cwd)

    def check_alive(self):
        if self.process.poll() is not None:
            raise BenchmarkError(
                f"{self.name} exited with status {self.process.returncode}"
                f"; last log lines:\n{self.log_tail()}")

    def log_tail(self, lines=10):
        with open(self.log_path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])

    def cpu_seconds(self):
        """Return the user and system CPU time of the process so far.

        ``ip netns exec`` and ``taskset`` exec the server, so the PID is
        the server's, and /proc/PID/stat sums all its threads, the ended
        ones included.
        """
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of proc(5); the split
        # above starts at field 3.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def wait_until(server, ready, action):
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        server.check_alive()
        if ready():
            return
        time.sleep(POLL_SECONDS)
    raise BenchmarkError(f"{server.name} did not {action} within "
                         f"{STARTUP_TIMEOUT_SECONDS} s; last log lines:\n"
                         f"{server.log_tail()}")


def start_pxeserver(lab, pxeserver_path, root, logdir):
    argv = [sys.executable, pxeserver_path, "--tftp-only", "--root", root,
            "--tftp-address", SERVER_ADDRESS, "--tftp-port", str(TFTP_PORT),
            "--http-address", SERVER_ADDRESS,
            "--http-port", str(PXESERVER_HTTP_PORT)]
    server = Server(lab, "pxeserver", argv,
                    os.path.join(logdir, "pxeserver.log"))

    def logged_ready():
        with open(server.log_path, errors="replace") as log:
            return "ready: mode=" in log.read()

    wait_until(server, logged_ready, "log its ready line")
    return server


def start_http_server(lab, root, logdir):
    # http.server serves its working directory; --directory needs 3.7.
    argv = [sys.executable, "-m", "http.server", "--bind", SERVER_ADDRESS,
            str(HTTP_SERVER_PORT)]
    server = Server(lab, "http.server", argv,
                    os.path.join(logdir, "http.server.log"), cwd=root)
    endpoint = f"{SERVER_ADDRESS}:{HTTP_SERVER_PORT}"

    def listening():
        sockets = run_command(["ip", "netns", "exec", lab.server_ns, "ss",
                               "--tcp", "--listening", "--numeric",
                               "--no-header"])
        return endpoint in sockets.split()

    wait_until(server, listening, f"listen on {endpoint}")
    return server


# ---------------------------------------------------------------------------
# Fetches
# ---------------------------------------------------------------------------


def fetch_url(server_name, protocol):
    if protocol == "tftp":
        return f"tftp://{SERVER_ADDRESS}:{TFTP_PORT}/{FILE_NAME}"
    port = (PXESERVER_HTTP_PORT if server_name == "pxeserver"
            else HTTP_SERVER_PORT)
    return f"http://{SERVER_ADDRESS}:{port}/{FILE_NAME}"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(lab, client_ns, client_cpu, server, protocol, output,
          expected_sha256):
    """Fetch the file once; return (seconds, server CPU seconds).

    The seconds are curl's time_total, from the start of the transfer,
    TCP connect included, to the last byte.
    """
    argv = ["curl", "--silent", "--show-error", "--fail",
            "--max-time", str(FETCH_TIMEOUT_SECONDS),
            "--write-out", "%{time_total} %{size_download}",
            "--output", output]
    if protocol == "tftp":
        argv += ["--tftp-blksize", str(BLKSIZE)]
    argv.append(fetch_url(server.name, protocol))
    cpu_before = server.cpu_seconds()
    result = lab.run(client_ns, pinned(client_cpu, argv),
                     timeout=FETCH_TIMEOUT_SECONDS + COMMAND_TIMEOUT_SECONDS)
    cpu = server.cpu_seconds() - cpu_before
    if result.returncode != 0:
        raise FetchError(f"curl {argv[-1]} failed with status "
                         f"{result.returncode}: "
                         f"{result.stderr.decode(errors='replace').strip()}")
    seconds_text, size_text = result.stdout.decode().split()
    if int(size_text) != FILE_BYTES:
        raise FetchError(f"curl {argv[-1]} got {size_text} bytes, "
                         f"expected {FILE_BYTES}")
    if sha256_of(output) != expected_sha256:
        raise FetchError(f"curl {argv[-1]} wrote the wrong bytes "
                         f"(SHA-256 differs)")
    os.unlink(output)
    return float(seconds_text), cpu


def run_fetches(lab, client_ns, servers, placements, runs, outdir,
                expected_sha256):
    """Fetch the file in every case; return {(placement, label): [...]}.

    Each list contains (seconds, server CPU seconds) per run.
    """
    samples = {}
    output = os.path.join(outdir, FILE_NAME)
    for placement in placements:
        client_cpu = CLIENT_CPUS[placement]
        for run in range(runs):
            # Alternate the order, so a drift in machine speed does not
            # favour the case that always goes first.
            order = CASES if run % 2 == 0 else tuple(reversed(CASES))
            for label, server_name, protocol in order:
                seconds, cpu = fetch(lab, client_ns, client_cpu,
                                     servers[server_name], protocol, output,
                                     expected_sha256)
                samples.setdefault((placement, label), []).append(
                    (seconds, cpu))
                print(f"  {placement} run {run + 1}: {label}: "
                      f"{FILE_BYTES / seconds / MEGABYTE:.1f} MB/s",
                      flush=True)
    return samples


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def print_summary(placement, runs, samples):
    """Print one placement's table; return its median MB/s by label."""
    client_cpu = CLIENT_CPUS[placement]
    print(f"\nveth, servers on vCPU {SERVER_CPU}, curl on vCPU {client_cpu} "
          f"({placement} vCPU), median of {runs} fetches of "
          f"{FILE_BYTES >> 20} MiB")
    print(f"  {'case':<20} {'MB/s':>8} {'seconds':>8} "
          f"{'server CPU ms':>14}")
    rates = {}
    for label, _, _ in CASES:
        runs_of_case = samples[placement, label]
        rates[label] = statistics.median(
            FILE_BYTES / seconds / MEGABYTE for seconds, _ in runs_of_case)
        seconds = statistics.median(seconds for seconds, _ in runs_of_case)
        # The kernel counts CPU time in clock ticks (10 ms at USER_HZ
        # 100), so the mean over the runs resolves more than a median.
        cpu = statistics.mean(cpu for _, cpu in runs_of_case)
        print(f"  {label:<20} {rates[label]:>8.1f} {seconds:>8.3f} "
              f"{cpu * 1e3:>14.0f}")
    http_ratio = rates["HTTP, pxeserver"] / rates["HTTP, http.server"]
    tftp_ratio = rates["HTTP, pxeserver"] / rates["TFTP, pxeserver"]
    print(f"  pxeserver HTTP / http.server HTTP: {http_ratio:.2f}x")
    print(f"  pxeserver HTTP / pxeserver TFTP:   {tftp_ratio:.2f}x")
    return rates


def describe_machine():
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")]
    model = models[0] if models else "unknown"
    return (f"{os.cpu_count()} vCPU ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def describe_curl():
    return run_command(["curl", "--version"]).splitlines()[0]


def load_average():
    """Return the 1, 5 and 15 minute load averages as text.

    A load near 0 at start and end shows that the run had the machine to
    itself.
    """
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def write_random_file(path, size):
    """Write ``size`` random bytes to ``path``; return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as output:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            output.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _placements(text):
    names = text.split(",")
    for name in names:
        if name not in CLIENT_CPUS:
            raise argparse.ArgumentTypeError(
                f"invalid placement {name!r}; use same, cross or "
                f"same,cross")
    return names


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help="fetches per case and placement (default: "
                             "%(default)s)")
    parser.add_argument("--placements", type=_placements,
                        default=list(CLIENT_CPUS),
                        help="curl's vCPU relative to the servers': same, "
                             "cross or both (default: same,cross)")
    parser.add_argument("--pxeserver", metavar="FILE",
                        default=PXESERVER_PATH,
                        help="pxeserver.py to measure, for example a copy "
                             "with a change (default: the one in this "
                             "repository)")
    return parser


def check_machine():
    if os.geteuid() != 0:
        raise BenchmarkError("network namespaces need root; run as root")
    if os.cpu_count() < 2:
        raise BenchmarkError("the cross-vCPU placement needs 2 vCPUs")
    for tool, package in (("ip", "iproute2"), ("ss", "iproute2"),
                          ("taskset", "util-linux"), ("curl", "curl")):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"{tool} not found; install the Debian "
                                 f"package {package}")


def run(args, lab, workdir, outdir):
    root = os.path.join(workdir, "root")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(root)
    os.makedirs(logdir)
    expected_sha256 = write_random_file(os.path.join(root, FILE_NAME),
                                        FILE_BYTES)
    client_ns = build_link(lab)
    pxeserver_path = os.path.abspath(args.pxeserver)

    print(f"machine: {describe_machine()}")
    print(f"client: {describe_curl()}")
    print(f"pxeserver: {pxeserver_path} (sha256 "
          f"{sha256_of(pxeserver_path)[:12]})")
    print(f"load average at start: {load_average()}")
    servers = {
        "pxeserver": start_pxeserver(lab, pxeserver_path, root, logdir),
        "http.server": start_http_server(lab, root, logdir),
    }
    samples = run_fetches(lab, client_ns, servers, args.placements,
                          args.runs, outdir, expected_sha256)
    for placement in args.placements:
        print_summary(placement, args.runs, samples)
    print(f"\nload average at end: {load_average()}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="bench_http.")
    # tmpfs keeps curl's writes out of the timings where it exists.
    outdir = tempfile.mkdtemp(prefix="bench_http.",
                              dir="/dev/shm" if os.path.isdir("/dev/shm")
                              else None)
    lab = None
    # SIGTERM raises SystemExit, so the cleanup below runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(2))
    try:
        check_machine()
        lab = netns.Lab()
        return run(args, lab, workdir, outdir)
    except (BenchmarkError, netns.LabError) as exc:
        print(f"bench_http: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, FetchError) else 2
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
