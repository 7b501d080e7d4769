#!/usr/bin/env python3
"""Adaptive load balancing, proven on loopback: three real backends, one degraded.

Run from the repository root:  python3 benches/adaptive.py [--seconds N] [--rate R]

The backends are small asyncio HTTP/1.1 servers started here. Two answer at once; the third
waits 50 ms per request and reports itself busy in ORCA's `endpoint-load-metrics` header
(cpu_utilization=0.95 against 0.1 for the others, equal rps_fractional). For each policy —
weighted_round_robin, least_request, peak_ewma, client_weighted — one Outrider (release
build) is started in front of them and oha sends a fixed rate for N seconds: the table gives
p50/p99/p99.9 latency and the degraded backend's share of the requests. A last run shows
slow start: a fourth backend is added by a reload and its share is sampled each second.

Needs oha (cargo install oha; benches/suite.py installs it) and a release build.
"""
import argparse, asyncio, json, os, subprocess, tempfile, threading, time

from suite import ROOT, free_port, oha_bin, wait_port

BIN = os.path.join(ROOT, "target", "release", "outrider")


class Backends:
    """HTTP/1.1 keep-alive servers on one asyncio loop in a thread, counting their requests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.hits = {}
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def add(self, name, delay, utilization):
        port = free_port()
        self.hits[name] = 0
        report = f"TEXT cpu_utilization={utilization}, rps_fractional=100".encode()

        async def serve(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if length:
                        await reader.readexactly(length)
                    if delay:
                        await asyncio.sleep(delay)
                    self.hits[name] += 1
                    body = name.encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nendpoint-load-metrics: %s\r\n\r\n%s"
                                 % (len(body), report, body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        async def start():
            await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        return port

    def reset(self):
        for k in self.hits:
            self.hits[k] = 0


def config(front, admin, policy, ports, extra=""):
    eps = "".join(f"      - addr: 127.0.0.1:{p}\n" for p in ports)
    return (f"admin:\n  bind: 127.0.0.1:{admin}\nshutdown:\n  drain_window: 0s\n  grace_period: 1s\n"
            f"listeners:\n  - name: front\n    bind: 127.0.0.1:{front}\n    service: svc\n"
            f"services:\n  svc:\n    load_balancing: {policy}\n{extra}"
            f"    outlier_detection: {{ consecutive_failures: 0 }}\n"
            f"    endpoints:\n{eps}")


def oha(port, secs, rate, backends):
    """Latency percentiles (ms) of the run, and the degraded backend's share in its 2nd half."""
    load = subprocess.Popen([oha_bin(), "-z", f"{secs}s",
                             "-q", str(rate), "-c", "50", "--latency-correction", "--no-tui",
                             "--output-format", "json", f"http://127.0.0.1:{port}/"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(secs / 2)
    mid = dict(backends.hits)
    out, _ = load.communicate()
    late = {k: backends.hits[k] - mid.get(k, 0) for k in backends.hits}
    p = json.loads(out)["latencyPercentiles"]
    late_share = late["slow"] / max(sum(late.values()), 1)
    return p["p50"] * 1e3, p["p99"] * 1e3, p["p99.9"] * 1e3, late_share


def run(policy, ports, backends, secs, rate, extra=""):
    tmp = tempfile.mkdtemp()
    front, admin = free_port(), free_port()
    path = os.path.join(tmp, "outrider.yaml")
    with open(path, "w") as f:
        f.write(config(front, admin, policy, ports, extra))
    proc = subprocess.Popen([BIN, "run", "--config", path], stderr=subprocess.DEVNULL)
    try:
        wait_port(front)
        backends.reset()
        p50, p99, p999, late = oha(front, secs, rate, backends)
        total = sum(backends.hits.values())
        return p50, p99, p999, backends.hits["slow"] / max(total, 1), late
    finally:
        proc.terminate()
        proc.wait()


def slow_start(backends, ports, rate):
    """A fourth backend joins by a reload; its share is sampled each second of the window."""
    tmp = tempfile.mkdtemp()
    front, admin = free_port(), free_port()
    path = os.path.join(tmp, "outrider.yaml")
    extra = "    slow_start: { window: 10s, floor_percent: 10 }\n"
    with open(path, "w") as f:
        f.write(config(front, admin, "weighted_round_robin", ports, extra))
    proc = subprocess.Popen([BIN, "run", "--config", path], stderr=subprocess.DEVNULL)
    new = backends.add("new", 0, 0.1)
    shares = []
    try:
        wait_port(front)
        load = subprocess.Popen([oha_bin(), "-z", "13s",
                                 "-q", str(rate), "-c", "20", "--no-tui", f"http://127.0.0.1:{front}/"],
                                stdout=subprocess.DEVNULL)
        time.sleep(1)
        with open(path + ".new", "w") as f:
            f.write(config(front, admin, "weighted_round_robin", ports + [new], extra))
        os.rename(path + ".new", path)  # a finished write: Outrider reloads
        for _ in range(12):
            backends.reset()
            time.sleep(1)
            total = sum(backends.hits.values())
            shares.append(100.0 * backends.hits["new"] / max(total, 1))
        load.wait()
    finally:
        proc.terminate()
        proc.wait()
    return shares


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=1000)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    backends = Backends()
    ports = [backends.add("fast1", 0, 0.1), backends.add("fast2", 0, 0.1), backends.add("slow", 0.05, 0.95)]
    rows = []
    for policy, extra in [("weighted_round_robin", ""), ("least_request", ""), ("peak_ewma", ""),
                          ("client_weighted", "    client_weighted: { blackout: 2s, update_period: 500ms }\n")]:
        rows.append((policy,) + run(policy, ports, backends, args.seconds, args.rate, extra))
    print(f"\nOne of three backends +50 ms and reporting cpu_utilization=0.95 (others 0.1); "
          f"{args.rate} req/s for {args.seconds} s, oha -c50 with latency correction.\n")
    print("| policy | p50 ms | p99 ms | p99.9 ms | degraded backend's share | its share, 2nd half |")
    print("|---|---|---|---|---|---|")
    for policy, p50, p99, p999, share, late in rows:
        print(f"| {policy} | {p50:.2f} | {p99:.2f} | {p999:.2f} | {share * 100:.1f} % | {late * 100:.1f} % |")
    shares = slow_start(backends, [p for p in ports], args.rate // 2)
    print("\nSlow start (window 10 s, floor 10 %): the new 4th backend's share of each second after it joined:")
    print(" ".join(f"{s:.0f}%" for s in shares))


if __name__ == "__main__":
    main()
