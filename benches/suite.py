#!/usr/bin/env python3
"""End-to-end benchmark suite: Outrider side by side with HAProxy and nginx.

Run from the repository root:  python3 benches/suite.py [--seconds N] [--rounds N]

Installs what it needs when missing (Debian: nginx-light, libnginx-mod-stream, haproxy, wrk,
nghttp2-client; cargo: oha), builds the release binary, and writes benches/RESULTS.md.
Each proxy runs pinned to core 0; the nginx backend and the load generators share core 1.
Proxies are measured in alternation, `--rounds` times, and each figure is the median.
All traffic stays on 127.0.0.1; every run is bounded in time.
"""
import argparse, json, os, platform, resource, shutil, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "outrider")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, text=True, capture_output=True, **kw).stdout


def ensure_tools():
    debs = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client", "etcd": "etcd-server"}
    missing = [pkg for tool, pkg in debs.items() if not shutil.which(tool)]
    if not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        missing.append("libnginx-mod-stream")
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("oha") and not os.path.exists(os.path.expanduser("~/.cargo/bin/oha")):
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)


def oha_bin():
    return shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} never opened")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Env:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="outrider-bench-")
        self.procs = []
        self.backend = free_port()
        self.backend_b = free_port()
        self.backend_tls = free_port()
        self.backend_tls_close = free_port()
        self.make_certs()

    def make_certs(self):
        """A CA and an ECDSA P-256 server certificate for 127.0.0.1 / localhost (OpenSSL)."""
        d = self.dir
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)
        run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        self.write("san.ext", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
        with open(os.path.join(d, "server-full.pem"), "w") as f:  # HAProxy wants cert and key in one file
            f.write(open(os.path.join(d, "server.pem")).read() + open(os.path.join(d, "server.key")).read())

    def spawn(self, cmd, core, **kw):
        p = subprocess.Popen(["taskset", "-c", str(core)] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_backend(self):
        conf = self.write("backend.conf", f"""
worker_processes 1; daemon off; pid {self.dir}/backend.pid; error_log {self.dir}/backend.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{self.backend}; location / {{ return 200 "hello\\n"; }} }}
  server {{ listen 127.0.0.1:{self.backend_b}; location / {{ return 200 "b\\n"; }} }}
  server {{ listen 127.0.0.1:{self.backend_tls} ssl; ssl_certificate {self.dir}/server.pem;
    ssl_certificate_key {self.dir}/server.key; location / {{ return 200 "hello\\n"; }} }}
  server {{ listen 127.0.0.1:{self.backend_tls_close} ssl; ssl_certificate {self.dir}/server.pem;
    ssl_certificate_key {self.dir}/server.key; keepalive_requests 1; location / {{ return 200 "hello\\n"; }} }} }}
""")
        self.spawn(["nginx", "-p", self.dir, "-c", conf], core=1)
        wait_port(self.backend)

    def start_outrider(self, extra="", binary=BIN, env=None, core=0):
        self.o_http, self.o_tcp, self.o_admin = free_port(), free_port(), free_port()
        self.o_tls_in, self.o_tls_out, self.o_tls_new = free_port(), free_port(), free_port()
        d = self.dir
        conf = self.write("outrider.yaml", f"""
admin: {{ bind: 127.0.0.1:{self.o_admin} }}
listeners:
  - {{ name: http, bind: 127.0.0.1:{self.o_http}, service: b }}
  - {{ name: tcp, bind: 127.0.0.1:{self.o_tcp}, protocol: tcp, service: b }}
  - {{ name: tls_in, bind: 127.0.0.1:{self.o_tls_in}, service: b, tls: {{ cert: {d}/server.pem, key: {d}/server.key }} }}
  - {{ name: tls_out, bind: 127.0.0.1:{self.o_tls_out}, service: bt }}
  - {{ name: tls_new, bind: 127.0.0.1:{self.o_tls_new}, service: bt_close }}
services:
  b: {{ endpoints: [{{ addr: 127.0.0.1:{self.backend} }}] }}
  bt: {{ endpoints: [{{ addr: 127.0.0.1:{self.backend_tls} }}], tls: {{ ca: {d}/ca.pem, server_name: localhost }} }}
  bt_close: {{ endpoints: [{{ addr: 127.0.0.1:{self.backend_tls_close} }}], tls: {{ ca: {d}/ca.pem, server_name: localhost }} }}
logging: {{ level: warn }}
{extra}
""")
        p = self.spawn([binary, "run", "--config", conf], core=core, env=env)
        wait_port(self.o_http)
        return p

    def start_haproxy(self, threads=1, core=0):
        self.h_http, self.h_h2, self.h_tcp = free_port(), free_port(), free_port()
        self.h_tls_in, self.h_tls_out, self.h_tls_new = free_port(), free_port(), free_port()
        d = self.dir
        conf = self.write(f"haproxy{threads}.cfg", f"""
global
  nbthread {threads}
  maxconn 8000
  ssl-server-verify required
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend fh
  bind 127.0.0.1:{self.h_http}
  bind 127.0.0.1:{self.h_h2} proto h2
  default_backend bh
backend bh
  server s1 127.0.0.1:{self.backend}
frontend ft
  mode tcp
  bind 127.0.0.1:{self.h_tcp}
  default_backend bt
backend bt
  mode tcp
  server s1 127.0.0.1:{self.backend}
frontend tls_in
  bind 127.0.0.1:{self.h_tls_in} ssl crt {d}/server-full.pem alpn h2,http/1.1
  default_backend bh
frontend tls_out
  bind 127.0.0.1:{self.h_tls_out}
  default_backend bs
backend bs
  server s1 127.0.0.1:{self.backend_tls} ssl verify required ca-file {d}/ca.pem sni str(localhost) verifyhost localhost
frontend tls_new
  bind 127.0.0.1:{self.h_tls_new}
  default_backend bs_close
backend bs_close
  server s1 127.0.0.1:{self.backend_tls_close} ssl verify required ca-file {d}/ca.pem sni str(localhost) verifyhost localhost
""")
        p = self.spawn(["haproxy", "-f", conf, "-db"], core=core)
        wait_port(self.h_http)
        return p

    def start_nginx(self):
        self.n_http, self.n_h2, self.n_tcp = free_port(), free_port(), free_port()
        conf = self.write("nginx.conf", f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1; daemon off; pid {self.dir}/proxy.pid; error_log {self.dir}/proxy.err;
worker_rlimit_nofile 16000;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream b {{ server 127.0.0.1:{self.backend}; keepalive 128; }}
  server {{ listen 127.0.0.1:{self.n_http}; listen 127.0.0.1:{self.n_h2} http2;
    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
stream {{ upstream bt {{ server 127.0.0.1:{self.backend}; }}
  server {{ listen 127.0.0.1:{self.n_tcp}; proxy_pass bt; }} }}
""")
        p = self.spawn(["nginx", "-p", self.dir, "-c", conf], core=0)
        wait_port(self.n_http)
        return p


def load(cmd):
    return sh(["taskset", "-c", "1"] + cmd)


def wrk_rps(port, secs):
    out = load(["wrk", "-t1", "-c50", f"-d{secs}s", f"http://127.0.0.1:{port}/"])
    return float(next(l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec")))


def wrk_url_rps(url, secs, conns=50, close=False):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s"] + (["-H", "Connection: close"] if close else []) + [url]
    out = load(cmd)
    return float(next(l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec")))


def tls(env, secs, rounds):
    """TLS on each side, Outrider beside HAProxy, both pinned to core 0, alternating:
    origination (plain in, TLS to an nginx ssl backend, keep-alive), termination (wrk over
    https, keep-alive), new TLS handshakes per second at the listener (wrk with
    `Connection: close`: a full handshake per request), and a new upstream TLS connection per
    request (the backend closes after each response: the proxies may resume sessions)."""
    rows = {"orig": "TLS origination, keep-alive req/s (wrk -c50)",
            "term": "TLS termination, keep-alive req/s (wrk -c50 https)",
            "hs_in": "TLS termination, new handshake per request (wrk -c50, Connection: close)",
            "hs_out": "TLS origination, new upstream connection per request (wrk -c50)"}
    ports = {"outrider": (env.o_tls_out, env.o_tls_in, env.o_tls_new),
             "haproxy": (env.h_tls_out, env.h_tls_in, env.h_tls_new)}
    out = {n: {k: [] for k in rows} for n in ports}
    for r in range(rounds):
        for name, (orig, term, new) in ports.items():
            out[name]["orig"].append(wrk_url_rps(f"http://127.0.0.1:{orig}/", secs))
            out[name]["term"].append(wrk_url_rps(f"https://127.0.0.1:{term}/", secs))
            out[name]["hs_in"].append(wrk_url_rps(f"https://127.0.0.1:{term}/", secs, close=True))
            out[name]["hs_out"].append(wrk_url_rps(f"http://127.0.0.1:{new}/", secs))
            print(f"tls round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in out[name].items()), flush=True)
    return rows, {n: {k: statistics.median(v) for k, v in m.items()} for n, m in out.items()}


def oha_latency(port, secs, rate):
    out = load([oha_bin(), "-z", f"{secs}s", "-q", str(rate), "-c", "16", "--latency-correction", "--no-tui",
                "--output-format", "json", f"http://127.0.0.1:{port}/"])
    j = json.loads(out)
    pct = j["latencyPercentiles"]
    return pct["p50"] * 1e6, pct["p99"] * 1e6  # microseconds


def h2load_rps(port, secs):
    out = load(["h2load", "-c", "10", "-m", "10", "-D", str(secs), f"http://127.0.0.1:{port}/"])
    line = next(l for l in out.splitlines() if l.startswith("finished in"))
    return float(line.split(",")[1].split()[0])


def measure(env, secs, rounds, rate):
    targets = {
        "direct": dict(http=env.backend, tcp=env.backend, h2=None),
        "outrider": dict(http=env.o_http, tcp=env.o_tcp, h2=env.o_http),
        "haproxy": dict(http=env.h_http, tcp=env.h_tcp, h2=env.h_h2),
        "nginx": dict(http=env.n_http, tcp=env.n_tcp, h2=env.n_h2),
    }
    results = {name: {"rps": [], "p50": [], "p99": [], "h2": [], "tcp": []} for name in targets}
    for r in range(rounds):
        for name, t in targets.items():  # alternate the proxies within each round
            results[name]["rps"].append(wrk_rps(t["http"], secs))
            p50, p99 = oha_latency(t["http"], secs, rate)
            results[name]["p50"].append(p50)
            results[name]["p99"].append(p99)
            if t["h2"]:
                results[name]["h2"].append(h2load_rps(t["h2"], secs))
            results[name]["tcp"].append(wrk_rps(t["tcp"], secs))
            print(f"round {r + 1} {name}: {results[name]['rps'][-1]:.0f} req/s, p99 {p99:.0f} us", flush=True)
    return {n: {k: statistics.median(v) if v else None for k, v in m.items()} for n, m in results.items()}


def two_threads(env, secs, rounds):
    """Outrider with 2 worker threads and HAProxy with nbthread 2, both on cores 0-1 (shared
    with the backend and the load generator: a sidecar given two cores, on a busy node)."""
    out = {"outrider": {"rps": [], "h2": []}, "haproxy": {"rps": [], "h2": []}}
    two = {**os.environ, "OUTRIDER_WORKER_THREADS": "2"}
    for _ in range(rounds):
        p = env.start_outrider(env=two, core="0,1")
        out["outrider"]["rps"].append(wrk_rps(env.o_http, secs))
        out["outrider"]["h2"].append(h2load_rps(env.o_http, secs))
        p.kill()
        p.wait(5)
        h = env.start_haproxy(threads=2, core="0,1")
        out["haproxy"]["rps"].append(wrk_rps(env.h_http, secs))
        out["haproxy"]["h2"].append(h2load_rps(env.h_h2, secs))
        h.kill()
        h.wait(5)
    return {n: {k: statistics.median(v) for k, v in m.items()} for n, m in out.items()}


def footprint(env):
    """RSS idle, with 1,000 endpoints, holding 10,000 idle connections; start-to-ready."""
    out = {}
    admin, port = free_port(), free_port()
    conf = env.write("idle.yaml", f"admin: {{ bind: 127.0.0.1:{admin} }}\nlisteners: [{{ name: h, bind: 127.0.0.1:{port}, service: b }}]\n"
                     f"services: {{ b: {{ endpoints: [{{ addr: 127.0.0.1:{env.backend} }}] }} }}\nlogging: {{ level: warn }}\n")
    started = time.perf_counter()
    p = env.spawn([BIN, "run", "--config", conf], core=0)
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.001)
        if time.perf_counter() - started > 10:
            raise RuntimeError("never ready")
    out["start_to_ready_ms"] = (time.perf_counter() - started) * 1000
    time.sleep(0.5)
    out["rss_idle_kib"] = rss_kib(p.pid)
    eps = ", ".join(f"{{ addr: 127.0.0.{1 + i // 250}:{20000 + i % 250} }}" for i in range(1000))
    big_port = free_port()
    conf = env.write("big.yaml", f"admin: {{ bind: 127.0.0.1:{free_port()} }}\nlisteners: [{{ name: h, bind: 127.0.0.1:{big_port}, service: b }}]\n"
                     f"services: {{ b: {{ endpoints: [{eps}] }} }}\nlogging: {{ level: warn }}\n")
    big = env.spawn([BIN, "run", "--config", conf], core=0)
    wait_port(big_port)
    time.sleep(1)
    out["rss_1000_endpoints_kib"] = rss_kib(big.pid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 30000), hard))
    socks = []
    for _ in range(10000):
        socks.append(socket.create_connection(("127.0.0.1", big_port)))
    time.sleep(1)
    out["rss_10000_idle_conns_kib"] = rss_kib(big.pid)
    for s in socks:
        s.close()
    return out


def etcd_propagation(env, samples=100):
    """etcd put -> first request routed to the new endpoint, in milliseconds."""
    client, peer = free_port(), free_port()
    data = os.path.join(env.dir, "etcd")
    url = f"http://127.0.0.1:{client}"
    env.spawn(["etcd", "--data-dir", data, "--listen-client-urls", url, "--advertise-client-urls", url,
               "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-cluster", f"default=http://127.0.0.1:{peer}"], core=1)
    wait_port(client)
    time.sleep(1)
    admin, port = free_port(), free_port()
    conf = env.write("etcd.yaml", f"admin: {{ bind: 127.0.0.1:{admin} }}\netcd: {{ endpoints: [{url}] }}\n"
                     f"listeners: [{{ name: h, bind: 127.0.0.1:{port}, service: b }}]\nservices: {{ b: {{ discovery: etcd }} }}\nlogging: {{ level: warn }}\n")
    env.spawn([BIN, "run", "--config", conf], core=0)
    wait_port(port)
    etcdctl = lambda *a: subprocess.run(["etcdctl", f"--endpoints={url}", *a], check=True, capture_output=True)
    current = (env.backend, "hello")
    etcdctl("put", "svc/b/x", f"127.0.0.1:{current[0]}")
    lat = []
    for i in range(samples):
        nxt = (env.backend_b, "b") if current[0] == env.backend else (env.backend, "hello")
        t0 = time.perf_counter()
        etcdctl("put", "svc/b/x", f"127.0.0.1:{nxt[0]}")
        put_done = time.perf_counter()
        while True:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode().strip()
            if body == nxt[1]:
                break
        lat.append((time.perf_counter() - put_done) * 1000)
        current = nxt
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99) - 1], "max_ms": lat[-1], "samples": samples}


def report(res, two, tls_res, fp, prop, args):
    d, o, h, n = res["direct"], res["outrider"], res["haproxy"], res["nginx"]
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
    lines = [
        "# Benchmark results", "",
        f"Command: `python3 benches/suite.py --seconds {args.seconds} --rounds {args.rounds} --rate {args.rate}`  ",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.platform()}; "
        f"HAProxy `{sh('haproxy -v').splitlines()[0].split()[2]}`, nginx `{sh('nginx -v 2>&1').strip().split('/')[-1]}`.  ",
        "Each proxy pinned to core 0 (HAProxy nbthread 1, nginx 1 worker, Outrider's runtime sees 1 core); "
        "nginx backend and load generators on core 1. Medians of the rounds; proxies alternate within each round.", "",
        "| figure | direct | Outrider | HAProxy | nginx | Outrider/HAProxy | Outrider/nginx | Outrider/direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def row(name, key, fmt, better_low=False):
        vals = [res[x][key] for x in ("direct", "outrider", "haproxy", "nginx")]
        cells = [fmt(v) if v is not None else "n/a" for v in vals]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio(vals[1], vals[2])} | {ratio(vals[1], vals[3])} | {ratio(vals[1], vals[0])} |")
    row("HTTP/1.1 keep-alive req/s (wrk -c50)", "rps", lambda v: f"{v:,.0f}")
    row(f"p50 latency µs at {args.rate} req/s (oha)", "p50", lambda v: f"{v:.0f}")
    row(f"p99 latency µs at {args.rate} req/s (oha)", "p99", lambda v: f"{v:.0f}")
    row("HTTP/2 h2c req/s (h2load -c10 -m10)", "h2", lambda v: f"{v:,.0f}")
    row("TCP mode req/s (wrk through L4)", "tcp", lambda v: f"{v:,.0f}")
    added = lambda x, k: res[x][k] - d[k]
    lines += ["", "Added latency over direct (µs): " + ", ".join(
        f"{x}: p50 {added(x, 'p50'):+.0f}, p99 {added(x, 'p99'):+.0f}" for x in ("outrider", "haproxy", "nginx")), "",
        "## Two worker threads (cores 0-1, shared with the backend and load generators)", "",
        "| figure | Outrider (2 workers) | HAProxy (nbthread 2) | Outrider/HAProxy |", "|---|---|---|---|",
        f"| HTTP/1.1 keep-alive req/s | {two['outrider']['rps']:,.0f} | {two['haproxy']['rps']:,.0f} | {ratio(two['outrider']['rps'], two['haproxy']['rps'])} |",
        f"| HTTP/2 h2c req/s | {two['outrider']['h2']:,.0f} | {two['haproxy']['h2']:,.0f} | {ratio(two['outrider']['h2'], two['haproxy']['h2'])} |", "",
        "## TLS (ECDSA P-256 certificates; rustls with ring vs HAProxy with OpenSSL; each pinned to core 0)", "",
        "| figure | Outrider | HAProxy | Outrider/HAProxy |", "|---|---|---|---|",
        *[f"| {label} | {tls_res[1]['outrider'][k]:,.0f} | {tls_res[1]['haproxy'][k]:,.0f} | "
          f"{ratio(tls_res[1]['outrider'][k], tls_res[1]['haproxy'][k])} |" for k, label in tls_res[0].items()], "",
        "## Footprint (Outrider)", "",
        f"- start to ready: {fp['start_to_ready_ms']:.1f} ms",
        f"- RSS idle: {fp['rss_idle_kib'] / 1024:.1f} MiB",
        f"- RSS with 1,000 endpoints: {fp['rss_1000_endpoints_kib'] / 1024:.1f} MiB",
        f"- RSS with 1,000 endpoints and holding 10,000 idle client connections: {fp['rss_10000_idle_conns_kib'] / 1024:.1f} MiB",
        "", "## etcd put → first request routed", "",
        f"- {prop['samples']} samples: p50 {prop['p50_ms']:.1f} ms, p99 {prop['p99_ms']:.1f} ms, max {prop['max_ms']:.1f} ms "
        "(measured from `etcdctl put` returning to the first response from the new endpoint; includes one HTTP round trip per poll)", ""]
    path = os.path.join(ROOT, "benches", "RESULTS.md")
    # Everything from "## History" on is kept: earlier runs and the A/B record of changes.
    history = ""
    if os.path.exists(path):
        old = open(path).read()
        if "\n## History" in old:
            history = old[old.index("\n## History"):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + history)
    print("\n".join(lines))


def ab(args):
    """Alternating A/B pairs of two Outrider builds (and HAProxy, the yardstick) in one go."""
    ensure_tools()
    env = Env()
    cores = "0" if args.threads == 1 else "0,1"
    worker_env = {**os.environ, "OUTRIDER_WORKER_THREADS": str(args.threads)}
    rows = []
    try:
        env.start_backend()
        env.start_haproxy()
        for pair in range(args.pairs):
            row = {}
            for label, binary in (("A", args.ab[0]), ("B", args.ab[1])):
                p = env.start_outrider(binary=binary, env=worker_env, core=cores)
                row[label] = (wrk_rps(env.o_http, args.seconds), h2load_rps(env.o_http, args.seconds))
                p.kill()
                p.wait(5)
            row["haproxy"] = (wrk_rps(env.h_http, args.seconds), h2load_rps(env.h_h2, args.seconds))
            rows.append(row)
            fmt = lambda t: f"h1 {t[0]:,.0f} h2c {t[1]:,.0f}"
            print(f"pair {pair + 1}: A {fmt(row['A'])} | B {fmt(row['B'])} | HAProxy {fmt(row['haproxy'])}", flush=True)
    finally:
        env.close()
    med = lambda k, i: statistics.median(r[k][i] for r in rows)
    for i, name in ((0, "HTTP/1.1 req/s"), (1, "h2c req/s")):
        print(f"{name}: A {med('A', i):,.0f}, B {med('B', i):,.0f} (B/A {med('B', i) / med('A', i):.2f}), "
              f"HAProxy {med('haproxy', i):,.0f} (B/HAProxy {med('B', i) / med('haproxy', i):.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=5000, help="fixed offered rate for the latency test")
    ap.add_argument("--ab", nargs=2, metavar=("BIN_A", "BIN_B"), help="alternating A/B pairs of two builds")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="Outrider worker threads (A/B mode)")
    ap.add_argument("--tls-only", action="store_true", help="only the TLS figures, printed (RESULTS.md untouched)")
    ap.add_argument("--binary", default=BIN, help="the Outrider build for --tls-only")
    args = ap.parse_args()
    if args.ab:
        return ab(args)
    if args.tls_only:
        ensure_tools()
        env = Env()
        try:
            env.start_backend()
            env.start_outrider(binary=args.binary)
            env.start_haproxy()
            rows, med = tls(env, args.seconds, args.rounds)
            for k, label in rows.items():
                o, h = med["outrider"][k], med["haproxy"][k]
                print(f"{label}: Outrider {o:,.0f}, HAProxy {h:,.0f} ({o / h:.2f}x)")
        finally:
            env.close()
        return
    ensure_tools()
    env = Env()
    try:
        env.start_backend()
        env.start_outrider()
        env.start_haproxy()
        env.start_nginx()
        res = measure(env, args.seconds, args.rounds, args.rate)
        tls_res = tls(env, args.seconds, args.rounds)
        two = two_threads(env, args.seconds, args.rounds)
        fp = footprint(env)
        prop = etcd_propagation(env)
        report(res, two, tls_res, fp, prop, args)
    finally:
        env.close()


if __name__ == "__main__":
    main()
