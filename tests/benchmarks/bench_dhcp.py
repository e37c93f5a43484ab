#!/usr/bin/env python3
"""DHCP throughput of pxeserver.py next to dnsmasq, measured with perfdhcp.

Run as root from the repository, by hand (it is not a unittest):

    python3 tests/benchmarks/bench_dhcp.py

It needs perfdhcp (Debian package kea-admin), dnsmasq (dnsmasq-base),
taskset (util-linux) and iproute2.  Everything runs inside the network
namespaces of a lab from tests/netns.py, which the script removes on exit:
the server runs in the server namespace on the veth end with 192.0.2.1/24,
and perfdhcp in a namespace of its own with 192.0.2.2/24, on a veth joined
to the lab's bridge.

perfdhcp (Kea 2.2) behaves as a relay agent: it puts its own address in
giaddr and sends from port 67, so the servers reply by unicast to
192.0.2.2:67, and their subnet must contain that address.  Both servers get
the same pool, 192.0.2.10-192.0.2.254, which is larger than the number of
clients that perfdhcp simulates.

Each server is pinned with taskset to one vCPU and perfdhcp to the other,
the same way for both servers.  Each run measures both servers, in an order
that alternates from run to run, because figures drift over time:

1. Rate at 0 % drops.  perfdhcp runs full DORA exchanges (DISCOVER, OFFER,
   REQUEST, ACK) at a fixed rate for a few seconds.  The rate doubles from
   START_RATE until a trial loses a reply, then BISECT_STEPS bisections
   narrow it down.  The result is the highest rate whose trial lost
   nothing.
2. Burst.  A freshly started server, with an empty lease file, gets
   BURST_CLIENTS new clients at BURST_RATE exchanges per second.  The
   result is the number of OFFERs and ACKs that came back.

The summary prints the median of each figure over the runs, and the ratio
of pxeserver's rate to dnsmasq's.
"""

import argparse
import os
import platform
import re
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

SERVER_ADDRESS = netns.SERVER_ADDRESS
PERFDHCP_ADDRESS = "192.0.2.2"
POOL_START = "192.0.2.10"
POOL_END = "192.0.2.254"
POOL_SIZE = 245
LEASE_SECONDS = 3600

SERVER_CPU = "1"
CLIENT_CPU = "0"

# Rate search, in DORA exchanges per second.  RATE_CLIENTS simulated
# clients (distinct MAC addresses) share the exchanges; it must stay below
# POOL_SIZE, or the pool runs out and the drops measure that instead.
RATE_CLIENTS = 200
START_RATE = 100
MAX_RATE = 12800
BISECT_STEPS = 4
RATE_STEP = 10  # bisection stops at this resolution
# A trial counts only if perfdhcp sent at least this share of the
# requested DISCOVERs; below it, perfdhcp and not the server is the limit.
MIN_SEND_SHARE = 0.95

# Burst: new clients at a fixed rate, one exchange each.
# NOTE: every new client takes a lease, and a /24 subnet has 253 addresses
# besides the server's.  So the burst sends 240 new clients at the rate of
# 500 per second, not 500 new clients.
BURST_CLIENTS = 240
BURST_RATE = 500

# perfdhcp's -W: after the last request it waits this long for replies
# before it reports, in microseconds.  Its -d (1 s by default) decides when
# a reply counts as dropped.
EXIT_WAIT_MICROSECONDS = 1000000

# Bounds on waits, in seconds.
READY_SECONDS = 30
STOP_SECONDS = 10
PERFDHCP_MARGIN_SECONDS = 20
SETTLE_SECONDS = 1  # pause, so one trial's backlog cannot reach the next

RATE_BASE_MAC = "02:00:00:00:00:00"
BURST_BASE_MAC = "02:00:00:01:00:00"

_SECTION = re.compile(r"^\*\*\*Statistics for: (\S+)\*\*\*$")
_COUNTER = re.compile(r"^(sent packets|received packets|drops): (\d+)$")


class BenchmarkError(Exception):
    """A missing tool, or a server or perfdhcp run that failed."""


class ServerProcess:
    """One DHCP server run in the lab's server namespace, pinned to a vCPU.

    The server's output goes to a log file, never through a pipe to this
    process, so no reader competes with the pinned processes for a vCPU.
    The server counts as ready once its process has a UDP socket on port
    67, which works for both servers, with their logging on or off.
    """

    name = ""

    def __init__(self, lab, workdir, quiet):
        self.lab = lab
        self.workdir = workdir
        self.quiet = quiet
        self.process = None
        self.log_path = None

    def command(self, lease_file):
        raise NotImplementedError

    def start(self, lease_file, label):
        """Start the server with lease_file and wait until it is bound."""
        self.log_path = os.path.join(self.workdir, f"{label}.log")
        argv = ["taskset", "-c", SERVER_CPU, *self.command(lease_file)]
        with open(self.log_path, "w") as log:
            self.process = self.lab.popen(
                self.lab.server_ns, argv, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.is_bound():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchmarkError(
            f"{self.name} did not bind UDP port 67 within {READY_SECONDS} "
            f"s; command: {argv}\n{self.log_tail()}"
        )

    def is_bound(self):
        """Tell whether the server's process has a socket on UDP port 67."""
        result = self.lab.run(
            self.lab.server_ns,
            ["ss", "-H", "-u", "-l", "-n", "-p", "sport = :67"],
            universal_newlines=True,
        )
        return f"pid={self.process.pid}," in result.stdout

    def stop(self):
        """Send SIGTERM, then SIGKILL after STOP_SECONDS."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_SECONDS)

    def read_log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def log_tail(self, count=20):
        lines = self.read_log().splitlines()[-count:]
        return f"{self.name} log tail:\n" + "\n".join(lines)


class PXEServer(ServerProcess):
    name = "pxeserver"

    def __init__(self, lab, workdir, quiet, path):
        super().__init__(lab, workdir, quiet)
        self.path = path

    def command(self, lease_file):
        root = os.path.join(self.workdir, "root")
        os.makedirs(root, exist_ok=True)
        return [
            sys.executable, self.path,
            "--iface", self.lab.server_iface, "--root", root,
            "--lease-file", lease_file, "--lease-time", str(LEASE_SECONDS),
            "--pool-start", POOL_START, "--pool-end", POOL_END,
            "--tftp-port", "0",
            "--log-level", "warning" if self.quiet else "info",
        ]


class Dnsmasq(ServerProcess):
    name = "dnsmasq"

    def command(self, lease_file):
        argv = [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--pid-file=", "--user=root", "--group=root",
            "--log-facility=-",
            f"--interface={self.lab.server_iface}", "--bind-interfaces",
            f"--dhcp-range={POOL_START},{POOL_END},{LEASE_SECONDS}",
            "--dhcp-authoritative", "--no-ping",
            f"--dhcp-leasefile={lease_file}",
        ]
        if self.quiet:
            argv.append("--quiet-dhcp")
        return argv


def parse_perfdhcp(output):
    """Return {exchange: {counter: value}} from perfdhcp's final report.

    exchange is "DISCOVER-OFFER" or "REQUEST-ACK"; counters are "sent
    packets", "received packets" and "drops".
    """
    sections = {}
    current = None
    for line in output.splitlines():
        line = line.strip()
        section = _SECTION.match(line)
        if section is not None:
            current = sections.setdefault(section.group(1), {})
            continue
        counter = _COUNTER.match(line)
        if counter is not None and current is not None:
            current[counter.group(1)] = int(counter.group(2))
    for exchange in ("DISCOVER-OFFER", "REQUEST-ACK"):
        if len(sections.get(exchange, {})) != 3:
            raise BenchmarkError(
                f"perfdhcp report has no complete {exchange} section:\n"
                f"{output}"
            )
    return sections


class Bench:
    """The lab, the two servers and perfdhcp, with a deadline on it all."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.workdir = tempfile.mkdtemp(prefix="bench-dhcp-")
        self.lease_dir = args.lease_dir or self.workdir
        self.lab = netns.Lab()
        self.client_ns = self.lab.add_namespace("gen")
        self.client_iface = self.lab.add_veth(self.client_ns)
        self.lab.run(self.client_ns, [
            "ip", "address", "add",
            f"{PERFDHCP_ADDRESS}/{netns.PREFIX_LENGTH}",
            "dev", self.client_iface,
        ], check=True)
        self.servers = [
            PXEServer(self.lab, self.workdir, args.quiet, args.pxeserver),
            Dnsmasq(self.lab, self.workdir, args.quiet),
        ]
        self.lease_files = []
        self.wait_for_bridge()

    def close(self):
        for server in self.servers:
            server.stop()
        self.lab.close()
        for path in self.lease_files:
            if os.path.exists(path):
                os.unlink(path)
        if self.args.keep_logs:
            print(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def wait_for_bridge(self):
        """Wait until the new veth's bridge port forwards frames.

        A new port drops frames for up to a second, until the kernel's
        link watch handles its carrier.
        """
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            result = self.lab.run(
                self.lab.client_ns, ["bridge", "link", "show"],
                universal_newlines=True,
            )
            states = re.findall(r" state (\w+)", result.stdout)
            if states and set(states) == {"forwarding"}:
                return
            time.sleep(0.05)
        raise BenchmarkError(f"bridge ports still not forwarding after "
                             f"{READY_SECONDS} s: {result.stdout}")

    def new_lease_file(self, server):
        """Return a new lease file path, which close() removes."""
        path = os.path.join(
            self.lease_dir, f"bench-dhcp-{os.getpid()}-{server.name}-"
                            f"{len(self.lease_files) + 1}.leases")
        self.lease_files.append(path)
        return path

    def check_deadline(self):
        if time.monotonic() > self.deadline:
            raise BenchmarkError(
                f"stopped after --max-minutes {self.args.max_minutes}; "
                f"use fewer --runs or a larger --max-minutes")

    def perfdhcp(self, extra_args, seconds):
        """Run perfdhcp pinned to CLIENT_CPU; return its parsed report."""
        self.check_deadline()
        argv = [
            "taskset", "-c", CLIENT_CPU, "perfdhcp", "-4",
            "-l", self.client_iface, "-W", str(EXIT_WAIT_MICROSECONDS),
            *extra_args, SERVER_ADDRESS,
        ]
        timeout = seconds + EXIT_WAIT_MICROSECONDS / 1e6 \
            + PERFDHCP_MARGIN_SECONDS
        try:
            result = self.lab.run(self.client_ns, argv, timeout=timeout,
                                  universal_newlines=True)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"perfdhcp still running after {timeout} "
                                 f"s: {argv}") from None
        # perfdhcp exits with 3 when some exchange was not completed.
        if result.returncode not in (0, 3):
            raise BenchmarkError(
                f"perfdhcp exited with status {result.returncode}: {argv}\n"
                f"{result.stdout}{result.stderr}")
        return parse_perfdhcp(result.stdout)

    def trial(self, server, rate):
        """Run one fixed-rate trial; return (passed, summary text)."""
        seconds = self.args.trial_seconds
        report = self.perfdhcp([
            "-r", str(rate), "-R", str(RATE_CLIENTS), "-p", str(seconds),
            "-b", f"mac={RATE_BASE_MAC}",
        ], seconds)
        time.sleep(SETTLE_SECONDS)
        offers = report["DISCOVER-OFFER"]
        acks = report["REQUEST-ACK"]
        drops = offers["drops"] + acks["drops"]
        send_share = offers["sent packets"] / (rate * seconds)
        summary = (f"sent={offers['sent packets']} "
                   f"offers={offers['received packets']} "
                   f"acks={acks['received packets']} drops={drops}")
        if send_share < MIN_SEND_SHARE:
            raise BenchmarkError(
                f"perfdhcp sent only {send_share:.0%} of the DISCOVERs at "
                f"{rate}/s ({summary}); the client is the limit, not "
                f"{server.name}")
        return drops == 0, summary

    def max_rate(self, server, run):
        """Return the highest rate of a trial that lost no reply."""
        server.start(self.new_lease_file(server), f"{server.name}-{run}")
        try:
            good, bad = 0, None
            rate = START_RATE
            while rate <= MAX_RATE and bad is None:
                passed, summary = self.trial(server, rate)
                self.report_trial(server, run, rate, passed, summary)
                if passed:
                    good, rate = rate, rate * 2
                else:
                    bad = rate
            if bad is None:
                print(f"  {server.name} lost nothing up to MAX_RATE "
                      f"{MAX_RATE}/s; the figure is a lower bound")
                return good
            for _ in range(BISECT_STEPS):
                rate = (good + bad) // 2 // RATE_STEP * RATE_STEP
                if rate <= good:
                    break
                passed, summary = self.trial(server, rate)
                self.report_trial(server, run, rate, passed, summary)
                if passed:
                    good = rate
                else:
                    bad = rate
            return good
        finally:
            server.stop()

    def report_trial(self, server, run, rate, passed, summary):
        verdict = "ok" if passed else "LOST"
        print(f"  run {run} {server.name:9} rate={rate:<6} {verdict:4} "
              f"{summary}", flush=True)

    def burst(self, server, run):
        """Return (offers, acks) for BURST_CLIENTS new clients."""
        server.start(self.new_lease_file(server),
                     f"{server.name}-{run}-burst")
        try:
            report = self.perfdhcp([
                "-r", str(BURST_RATE), "-n", str(BURST_CLIENTS),
                "-R", str(BURST_CLIENTS), "-b", f"mac={BURST_BASE_MAC}",
            ], BURST_CLIENTS / BURST_RATE)
        finally:
            server.stop()
        offers = report["DISCOVER-OFFER"]["received packets"]
        acks = report["REQUEST-ACK"]["received packets"]
        print(f"  run {run} {server.name:9} burst: offers={offers} "
              f"acks={acks} of {BURST_CLIENTS} clients", flush=True)
        return offers, acks

    def run(self):
        rates = {server.name: [] for server in self.servers}
        bursts = {server.name: [] for server in self.servers}
        for run in range(1, self.args.runs + 1):
            order = self.servers if run % 2 else self.servers[::-1]
            for server in order:
                rates[server.name].append(self.max_rate(server, run))
            for server in order:
                bursts[server.name].append(self.burst(server, run))
        return rates, bursts


def describe_machine(lease_dir):
    """Return lines naming the machine, the tools and the lease storage."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    versions = []
    for argv in (["dnsmasq", "--version"], ["perfdhcp", "-v"]):
        result = subprocess.run(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                universal_newlines=True, timeout=10)
        versions.append(result.stdout.splitlines()[0].strip())
    filesystem = subprocess.run(
        ["stat", "-f", "-c", "%T", lease_dir], stdout=subprocess.PIPE,
        universal_newlines=True, timeout=10).stdout.strip()
    return [
        f"machine: {os.cpu_count()} vCPU, {model}, Linux "
        f"{platform.release()}, Python {platform.python_version()}",
        f"tools: {versions[0]}; perfdhcp {versions[1]}",
        f"lease files: {lease_dir} ({filesystem})",
    ]


def print_summary(rates, bursts):
    print("\nsummary (medians over runs)")
    medians = {}
    for name, values in rates.items():
        medians[name] = statistics.median(values)
        print(f"  {name:9} rate at 0 % drops: {medians[name]:.0f} "
              f"exchanges/s (runs: {', '.join(map(str, values))})")
    if medians["dnsmasq"]:
        ratio = medians["pxeserver"] / medians["dnsmasq"]
        print(f"  ratio pxeserver/dnsmasq: {ratio:.2f}")
    for name, values in bursts.items():
        offers = statistics.median(offer for offer, _ in values)
        acks = statistics.median(ack for _, ack in values)
        print(f"  {name:9} burst of {BURST_CLIENTS} new clients at "
              f"{BURST_RATE}/s: {offers:.0f} offers, {acks:.0f} acks "
              f"(runs: {values})")


def check_environment():
    if os.geteuid() != 0:
        raise BenchmarkError("run as root: the benchmark creates network "
                             "namespaces")
    tools = {"perfdhcp": "kea-admin", "dnsmasq": "dnsmasq-base",
             "taskset": "util-linux", "ip": "iproute2",
             "bridge": "iproute2"}
    missing = [f"{tool} (Debian package {package})"
               for tool, package in tools.items()
               if shutil.which(tool) is None]
    if missing:
        raise BenchmarkError(f"missing {', '.join(missing)}")
    if (os.cpu_count() or 1) < 2:
        raise BenchmarkError("needs 2 vCPUs: one for the server, one for "
                             "perfdhcp")
    reason = netns.check_lab_support()
    if reason is not None:
        raise BenchmarkError(reason)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, metavar="COUNT",
                        help="runs over both servers (default: %(default)s)")
    parser.add_argument("--trial-seconds", type=int, default=3,
                        metavar="SECONDS",
                        help="length of one fixed-rate trial, in seconds "
                             "(default: %(default)s)")
    parser.add_argument("--lease-dir", metavar="DIR",
                        help="folder for the servers' lease files, such as "
                             "/dev/shm to take the disk out of the figures "
                             "(default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true",
                        help="turn off the per-exchange log lines of both "
                             "servers")
    parser.add_argument("--max-minutes", type=float, default=30,
                        metavar="MINUTES",
                        help="stop the benchmark after this many minutes "
                             "(default: %(default)s)")
    parser.add_argument("--pxeserver", metavar="FILE",
                        default=PXESERVER_PATH,
                        help="pxeserver.py to measure, such as a copy with "
                             "a change under test (default: %(default)s)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the servers' logs and print where")
    return parser


def _exit_on_sigterm(signum, frame):
    sys.exit(f"bench_dhcp: stopped by signal {signum}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    # SystemExit runs the finally clauses, which stop the servers and
    # delete the namespaces.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        check_environment()
        bench = Bench(args)
    except (BenchmarkError, netns.LabUnavailable) as exc:
        print(f"bench_dhcp: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"command: {' '.join(sys.argv)}")
        for line in describe_machine(bench.lease_dir):
            print(line)
        print(f"pinning: server on vCPU {SERVER_CPU}, perfdhcp on vCPU "
              f"{CLIENT_CPU}; {RATE_CLIENTS} clients, pool of {POOL_SIZE}, "
              f"{args.trial_seconds} s trials, logging "
              f"{'off' if args.quiet else 'on'}", flush=True)
        rates, bursts = bench.run()
        print_summary(rates, bursts)
    except BenchmarkError as exc:
        print(f"bench_dhcp: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
