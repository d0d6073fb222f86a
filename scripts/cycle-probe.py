#!/usr/bin/env python3
"""Measure gpu-agent's decision-cycle timing from the outside (loopback only, bounded in time).

  poll URL --interval 0.01 --duration 60 --period 1
      GETs the agent's /metrics every --interval seconds (one kept-alive connection) and notes
      when gpu_agent_cycles_total goes up; the intervals between increments, minus the period,
      are the jitter. Resolution: one poll interval plus one request.
  proxy --listen 127.0.0.1:P --upstream http://127.0.0.1:A/metrics --duration 60 --period 1
      serves the agent's vLLM metrics_url: it stamps each request on arrival (the scrape is the
      first thing a cycle does) and forwards it to the real vLLM (or vllm-sim). Sub-millisecond.
  hist BEFORE AFTER
      quantiles of gpu_agent_cycle_duration_seconds between two /metrics snapshots (bucket
      bounds, so a quantile is "at most this").
Only the standard library.
"""
import argparse
import http.client
import http.server
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request


def quantile(xs, q):
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def report(starts, period, label):
    """Prints interval jitter (|gap - period|) and the offset from a fitted fixed schedule."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if len(gaps) < 2:
        print(f"{label}: only {len(starts)} cycle starts seen", file=sys.stderr)
        return 1
    dev = [abs(g - period) * 1000 for g in gaps]
    print(f"{label}: cycles={len(starts)} gaps={len(gaps)} "
          f"gap mean={statistics.mean(gaps) * 1000:.2f} ms sd={statistics.pstdev(gaps) * 1000:.2f} ms "
          f"min={min(gaps) * 1000:.2f} max={max(gaps) * 1000:.2f}")
    print(f"{label}: jitter |gap-period| p50={quantile(dev, 0.5):.2f} ms p99={quantile(dev, 0.99):.2f} ms "
          f"max={max(dev):.2f} ms; gaps off by >10 ms: {sum(d > 10 for d in dev)}/{len(dev)}")
    # Offset of each start from t0 + k*period (the ticker keeps a fixed schedule).
    k0 = starts[0]
    off = [(t - k0 - round((t - k0) / period) * period) * 1000 for t in starts]
    base = statistics.median(off)
    late = [o - base for o in off]
    print(f"{label}: start offset from schedule (vs median) p50={quantile([abs(x) for x in late], 0.5):.2f} ms "
          f"p99={quantile([abs(x) for x in late], 0.99):.2f} ms max={max(abs(x) for x in late):.2f} ms")
    return 0


def cycles_of(body):
    for line in body.splitlines():
        if line.startswith("gpu_agent_cycles_total "):
            return int(float(line.split()[1]))
    return None


def poll(args):
    u = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=2)
    starts, last, end, polls, errors = [], None, time.monotonic() + args.duration, 0, 0
    next_at = time.monotonic()
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            conn.request("GET", u.path or "/metrics")
            n = cycles_of(conn.getresponse().read().decode())
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=2)
            n = None
        polls += 1
        if n is not None:
            if last is not None and n > last:
                starts.append(t)  # the increment happened between the previous poll and this one
            last = n
        next_at += args.interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"poll: {polls} polls in {args.duration:.0f} s ({polls / args.duration:.0f}/s, "
          f"asked {1 / args.interval:.0f}/s), {errors} errors; resolution ~{args.interval * 1000:.0f} ms")
    return report(starts, args.period, "poll")


def proxy(args):
    starts, lock = [], threading.Lock()
    upstream = args.upstream

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            t = time.monotonic()
            with lock:
                starts.append(t)
            try:
                with urllib.request.urlopen(upstream, timeout=2) as r:
                    body, ctype = r.read(), r.headers.get("Content-Type", "text/plain")
                code = 200
            except OSError as e:
                body, ctype, code = str(e).encode(), "text/plain", 502
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    host, port = args.listen.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("proxy: loopback addresses only", file=sys.stderr)
        return 2
    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"proxy: listening on {args.listen} for {args.duration:.0f} s", flush=True)
    time.sleep(args.duration)
    srv.shutdown()
    with lock:
        s = list(starts)
    # Skip the first few cycles (start-up) when there are enough.
    return report(s[3:] if len(s) > 10 else s, args.period, "proxy")


def buckets(path):
    out, total = {}, None
    with open(path) as f:
        for line in f:
            if line.startswith("gpu_agent_cycle_duration_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
            elif line.startswith("gpu_agent_cycle_duration_seconds_sum "):
                total = float(line.split()[-1])
    return out, total


def hist(args):
    b0, s0 = buckets(args.before)
    b1, s1 = buckets(args.after)
    les = sorted(b1)
    d = {le: b1[le] - b0.get(le, 0.0) for le in les}
    n = d[float("inf")]
    if n <= 0:
        print("hist: no cycles between the snapshots", file=sys.stderr)
        return 1
    mean = (s1 - s0) / n * 1000
    parts = []
    for q in (0.5, 0.9, 0.99):
        le = next(le for le in les if d[le] >= q * n)
        parts.append(f"p{int(q * 100)}<={le * 1000:g} ms")
    print(f"cycle duration: {n:.0f} cycles, mean {mean:.2f} ms, " + ", ".join(parts)
          + "; per bucket: " + " ".join(f"le{le * 1000:g}ms={d[le]:.0f}" for le in les))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("poll")
    a.add_argument("url")
    a.add_argument("--interval", type=float, default=0.01)
    a.add_argument("--duration", type=float, default=60)
    a.add_argument("--period", type=float, default=1.0)
    b = sub.add_parser("proxy")
    b.add_argument("--listen", required=True)
    b.add_argument("--upstream", required=True)
    b.add_argument("--duration", type=float, default=60)
    b.add_argument("--period", type=float, default=1.0)
    c = sub.add_parser("hist")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args()
    return {"poll": poll, "proxy": proxy, "hist": hist}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
