#!/usr/bin/env python3
"""keycard against the proxies operators already run, measured side by side in one run.

Started by scripts/bench.sh (which installs nginx, haproxy, wrk and redis-server and builds
keycard). Everything listens on 127.0.0.1 only, and every load run is bounded by wrk's -d.

Peers, all in front of one nginx `return 200` upstream:
  upstream   the upstream directly (the ceiling)
  nginx      nginx as a plain reverse proxy, upstream keep-alive, no auth
  haproxy    HAProxy with jwt_verify (HS256 signature, and exp against the clock)
  keycard    keycard with a valid HS256 token and the Redis revocation check

Each peer gets the same wrk (-t1, same connections, same duration) in alternation, over
several rounds; the table shows medians. CPU us/request is user+sys of the peer's own
processes (from /proc/PID/stat) over the requests wrk completed; for keycard, redis-server's
share is its own column. Peak RSS is VmHWM summed over the peer's processes, reset before
each measured run (so it is the peak under that load, not during setup). Ratios are to
nginx in the same run: on a shared 2-core machine only those ratios mean anything.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            tail = open(log).read()[-2000:] if log else ""
            sys.exit(f"{what} exited early with {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def children(pid):
    """pid and all its descendants (nginx's workers)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for c in f.read().split():
                out.extend(children(int(c)))
    except OSError:
        pass
    return out


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def reset_peak(pids):
    """Peak RSS starts again from the current RSS (Linux: 5 > clear_refs), so a peak measured
    under load is not the setup's (keycard hashes a password at startup and for the login that
    gets the bench token: argon2 needs memory_kib, 19 MiB, while it runs)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def status_kib(pids, key):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def parse_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def wrk(url, conns, secs, headers=(), script=None, threads=1):
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30).stdout
    r = {}
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        r[f"p{pct}"] = parse_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["bad"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["errors"] = sum(int(x) for x in m.groups()) if m else 0
    r["raw"] = out
    return r


def hold_connections(url, n, headers):
    """n keep-alive connections to url, each having made one request (answered 200)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    head = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    held = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(head.encode())
        reply = sock.recv(65536)
        if not reply.startswith(b"HTTP/1.1 200"):
            sys.exit(f"held connection got {reply[:60]!r}")
        held.append(sock)
    return held


class Peer:
    def __init__(self, name, label, url, pids_fn, headers=(), side_pids_fn=None):
        self.name, self.label, self.url = name, label, url
        self.pids_fn, self.headers, self.side_pids_fn = pids_fn, headers, side_pids_fn
        self.runs = []

    def measure(self, conns, secs):
        pids = self.pids_fn()
        side = self.side_pids_fn() if self.side_pids_fn else []
        reset_peak(pids)
        c0, s0 = cpu_ticks(pids), cpu_ticks(side)
        r = wrk(self.url, conns, secs, self.headers)
        c1, s1 = cpu_ticks(pids), cpu_ticks(side)
        n = max(r["requests"], 1)
        r["cpu_us"] = (c1 - c0) / CLK_TCK * 1e6 / n
        r["side_us"] = (s1 - s0) / CLK_TCK * 1e6 / n if side else None
        r["rss_mib"] = status_kib(self.pids_fn(), "VmHWM") / 1024
        self.runs.append(r)
        return r


def med(runs, key):
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keycard", required=True)
    ap.add_argument("--hash-rate", required=True, help="the examples/hash_rate binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--login-secs", type=int, default=10)
    ap.add_argument("--compare", help="a second keycard binary, measured as keycard-b")
    ap.add_argument("--only", default="", help="comma-separated peers to run (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not (1 <= args.rounds <= 10 and 1 <= args.secs <= 120 and 1 <= args.conns <= 2000):
        sys.exit("rounds 1..10, secs 1..120, conns 1..2000")

    work = tempfile.mkdtemp(prefix="keycard-bench-")
    procs = []

    def spawn(cmd, log, env=None):
        f = open(os.path.join(work, log), "w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        p.log_path = f.name
        procs.append(p)
        return p

    def stop_all():
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    try:
        run(args, work, spawn)
    finally:
        stop_all()


def nginx_conf(work, name, workers, body):
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""daemon off;
master_process on;
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {work}/{name}.access.log;
  client_body_temp_path {work}/{name}-body;
  proxy_temp_path {work}/{name}-proxy;
  fastcgi_temp_path {work}/{name}-fcgi;
  uwsgi_temp_path {work}/{name}-uwsgi;
  scgi_temp_path {work}/{name}-scgi;
  keepalive_requests 1000000;
{body}
}}
""")
    return path


def run(args, work, spawn):
    W = args.workers
    up_port, ngx_port, ha_port = free_port(), free_port(), free_port()
    redis_port = free_port()
    secret = secrets.token_hex(32)

    # The upstream: nginx return 200, one worker per core so it is never the bottleneck,
    # no access log (it is the ceiling, not a peer).
    up_conf = nginx_conf(work, "upstream", "auto", f"""
  server {{
    listen 127.0.0.1:{up_port};
    access_log off;
    location / {{ return 200 "ok\\n"; }}
  }}""")
    up = spawn(["nginx", "-c", up_conf, "-p", work], "upstream.out")
    wait_port(up_port, up, "upstream nginx")

    ngx_conf = nginx_conf(work, "proxy", W, f"""
  upstream backend {{ server 127.0.0.1:{up_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ngx_port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")
    ngx = spawn(["nginx", "-c", ngx_conf, "-p", work], "proxy.out")
    wait_port(ngx_port, ngx, "nginx proxy")

    ha_conf = os.path.join(work, "haproxy.cfg")
    with open(ha_conf, "w") as f:
        f.write(f"""global
  nbthread {W}
  maxconn 1500
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{ha_port}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{secret}") -m int 1 }}
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
  default_backend be
backend be
  http-reuse always
  server up 127.0.0.1:{up_port}
""")
    ha = spawn(["haproxy", "-f", ha_conf, "-db"], "haproxy.out")
    wait_port(ha_port, ha, "haproxy")

    redis = spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no"], "redis.out")
    wait_port(redis_port, redis, "redis-server")

    env = dict(os.environ)
    env.setdefault("KEYCARD_LOG", "info")

    def start_keycard(name, binary):
        port, admin = free_port(), free_port()
        conf = os.path.join(work, f"{name}.toml")
        with open(conf, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{port}"
workers = {W}
max_connections = 20000
[admin]
listen = "127.0.0.1:{admin}"
[store]
url = "redis://127.0.0.1:{redis_port}/0"
[tokens]
secret = "{secret}"
access_ttl = "1h"
[passwords]
max_concurrent = {W}
max_queue = 1024
queue_timeout = "30s"
[throttle]
user_limit = 0
address_limit = 0
[[routes]]
path = "/"
upstream = "http://127.0.0.1:{up_port}"
auth = "required"
""")
        proc = spawn([binary, "--config", conf], f"{name}.log", env=env)
        wait_port(port, proc, name)
        return proc, port

    kc, kc_port = start_keycard("keycard", args.keycard)
    if args.compare:
        kc_b, kc_b_port = start_keycard("keycard-b", args.compare)

    base = f"http://127.0.0.1:{kc_port}"
    body = json.dumps({"username": "bench", "password": "bench-password-1"}).encode()

    def post(path, data):
        req = urllib.request.Request(base + path, data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    post("/register", body)
    token = post("/login", body)["access_token"]
    auth = f"Authorization: Bearer {token}"

    peers = [
        Peer("upstream", "upstream direct (the ceiling)", f"http://127.0.0.1:{up_port}/",
             lambda: children(up.pid)),
        Peer("nginx", f"nginx plain reverse proxy, {W} worker, keep-alive, no auth",
             f"http://127.0.0.1:{ngx_port}/", lambda: children(ngx.pid), [auth]),
        Peer("haproxy", f"HAProxy jwt_verify HS256 + exp, {W} thread",
             f"http://127.0.0.1:{ha_port}/", lambda: [ha.pid], [auth]),
        Peer("keycard", f"keycard, {W} worker, HS256 + Redis revocation check",
             f"http://127.0.0.1:{kc_port}/", lambda: [kc.pid], [auth],
             side_pids_fn=lambda: [redis.pid]),
    ]
    if args.compare:
        peers.append(Peer("keycard-b", f"keycard-b ({args.compare})",
                          f"http://127.0.0.1:{kc_b_port}/", lambda: [kc_b.pid], [auth],
                          side_pids_fn=lambda: [redis.pid]))
    only = {p for p in args.only.split(",") if p}
    if only:
        peers = [p for p in peers if p.name in only or p.name == "nginx"]

    # Every peer must answer 200 before anything is measured.
    for p in peers:
        r = wrk(p.url, 1, 1, p.headers)
        if r["requests"] == 0 or r["bad"] or r["errors"]:
            sys.exit(f"{p.name} does not answer 200: {r['raw']}")

    print(f"==> {args.rounds} rounds x {len(peers)} peers, wrk -t1 -c{args.conns} "
          f"-d{args.secs}s after a {args.warmup}s warm-up each, {W} worker(s)", flush=True)
    failed = False
    for rnd in range(1, args.rounds + 1):
        for p in peers:
            wrk(p.url, args.conns, args.warmup, p.headers)
            r = p.measure(args.conns, args.secs)
            if r["bad"] or r["errors"]:
                failed = True
            print(f"    round {rnd} {p.name:8} {r['rps']:>10.0f} req/s  p99 {r['p99']:.2f} ms  "
                  f"cpu {r['cpu_us']:.1f} us/req  bad {r['bad']} errors {r['errors']}",
                  flush=True)

    base_p = next(p for p in peers if p.name == "nginx")
    n_rps, n_p99 = med(base_p.runs, "rps"), med(base_p.runs, "p99")
    n_cpu, n_rss = med(base_p.runs, "cpu_us"), med(base_p.runs, "rss_mib")
    print()
    print("| peer | req/s | × nginx | p50 ms | p99 ms | × nginx | CPU µs/req | × nginx "
          "| + redis-server µs/req | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in peers:
        rps, p50, p99 = med(p.runs, "rps"), med(p.runs, "p50"), med(p.runs, "p99")
        cpu, side, rss = med(p.runs, "cpu_us"), med(p.runs, "side_us"), med(p.runs, "rss_mib")
        name = f"**{p.label}**" if p.name.startswith("keycard") else p.label
        side_s = f"{side:.1f}" if side is not None else "–"
        print(f"| {name} | {rps:,.0f} | {rps / n_rps:.2f} | {p50:.2f} | {p99:.2f} | "
              f"{p99 / n_p99:.2f} | {cpu:.1f} | {cpu / n_cpu:.2f} | {side_s} | {rss:.0f} |")
    _ = n_rss

    # Many keep-alive connections: keycard's peak RSS while N connections that each made one
    # request stay open and the usual load runs beside them, then with all N making requests.
    kc_peer = next((p for p in peers if p.name == "keycard"), None)
    if args.idle_conns:
        print()
        for p in peers:
            if p.name == "upstream":
                continue
            pids = p.pids_fn()
            reset_peak(pids)
            held = hold_connections(p.url, args.idle_conns, p.headers)
            r = wrk(p.url, args.conns, 5, p.headers)
            idle_rss = status_kib(pids, "VmHWM") / 1024
            for sock in held:
                sock.close()
            reset_peak(pids)
            a = wrk(p.url, args.idle_conns, 5, p.headers)
            busy_rss = status_kib(pids, "VmHWM") / 1024
            print(f"{p.name}: {len(held)} open keep-alive connections + wrk -c{args.conns}: "
                  f"peak RSS {idle_rss:.1f} MiB ({r['rps']:,.0f} req/s); all "
                  f"{args.idle_conns} busy (wrk -c{args.idle_conns}): peak RSS {busy_rss:.1f} MiB "
                  f"({a['rps']:,.0f} req/s, bad {r['bad'] + a['bad']}, "
                  f"errors {r['errors'] + a['errors']})")

    if kc_peer and args.login_secs:
        login_bench(args, base, body, work, kc)

    if failed:
        print("\nsome runs saw non-2xx answers or socket errors", file=sys.stderr)
        sys.exit(1)


def login_bench(args, base, body, work, kc):
    """Logins/s against raw argon2id hashes/s on the same number of threads."""
    lua = os.path.join(work, "login.lua")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\n'
                f"wrk.body = '{body.decode()}'\n"
                'wrk.headers["Content-Type"] = "application/json"\n')
    conns = max(2, 2 * args.workers)
    r = wrk(base + "/login", conns, args.login_secs, script=lua)
    raw = subprocess.run([args.hash_rate, str(args.workers), str(args.login_secs)],
                         capture_output=True, text=True, timeout=args.login_secs + 60)
    m = re.search(r"([\d.]+) hashes/s", raw.stdout)
    hps = float(m.group(1)) if m else float("nan")
    print(f"\nlogins: {r['rps']:.1f}/s (wrk -c{conns}, p99 {r['p99']:.0f} ms, bad {r['bad']}); "
          f"raw argon2id on {args.workers} thread(s): {hps:.1f} hashes/s; "
          f"ratio {r['rps'] / hps:.2f}")


if __name__ == "__main__":
    main()
