"""Delivery at internet latency (issue 10): the rows for a Vero that answers
after 150 ms (bench/slow_standin.py), each beside its baseline from the same run.

- drain: identifies queued with delivery off, then drained by the default
  Procfile line on SQLite (calls/s, the projected time for 1,000,000
  identifies, peak memory per worker with the window full); baseline: a plain
  requests.Session loop with as many threads as the windows' ceilings allow,
  against the same slow stand-in; and the same drain against an upstream
  that answers at once, for comparison;
- postgres: the same drain by web (delivery off) plus the Procfile's `worker:`
  line on PostgreSQL (a database of its own, dropped afterwards);
- 429: while a queue drains, the stand-in answers 429 with Retry-After for a
  moment: how many calls arrived during the pause (none may), and how the
  window (read from /metrics) fell and recovered;
- ingest while draining: single-message ingest (wrk, as the ingest row)
  while 100,000 queued identifies drain at full speed, against the same
  ingest with delivery idle; the two alternate for INGEST_ROUNDS rounds on
  one backlog (rates pooled, p99 the worst round's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import bodies, paced
from bench.service import ROOT, Gunicorn
from bench.slow_standin import SlowStandIn
from bench.standin import VERO_REPLY, StandIn

LATENCY = 0.15
# Idle and draining ingest alternate this often in a full run.
INGEST_ROUNDS = 3
TARGET_CALLS_PER_S = 500.0
AUDIENCE = 1_000_000
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DATABASE = "delivery_bench"
FLASK = Path(sys.executable).with_name("flask")
METRIC = re.compile(r'^(vero_bridge_upstream_\w+)\{upstream="vero"\} (\S+)$', re.M)


def sizes(run) -> dict[str, int]:
    quick = run.plan.fill < 10_000
    return {
        "drain": 6_000 if quick else 30_000,
        "postgres": 4_000 if quick else 20_000,
        "throttled": 16_000 if quick else 24_000,
        "backlog": 20_000 if quick else 100_000,
    }


def identify(tok: str, n: int) -> dict:
    """An audience sync's identify: a user of its own, one Vero call each."""
    return {
        "type": "identify",
        "userId": f"aud-{n}",
        "messageId": tok,
        "timestamp": bodies.TIMESTAMP,
        "traits": {"bench": tok, "plan": "pro", "email": f"aud-{n}@example.com"},
    }


def queue_identifies(port: int, count: int, phase: str) -> None:
    """Queue `count` identifies, 100 a request, and check each was accepted."""
    from bench.harness import A_HEADERS

    per_request = 100

    def build(i: int):
        numbered = [
            (bodies.token(phase, 0, n), n) for n in range(i * per_request, (i + 1) * per_request)
        ]
        body = {"batch": [identify(tok, n) for tok, n in numbered]}
        return "/v1/batch", bodies.encode(body), [tok for tok, _ in numbered]

    needed = count // per_request
    result = paced.run(port, A_HEADERS, build, rate=1e6, seconds=needed / 1e6, threads=4)
    if result.errors or len(result.acked) != needed * per_request:
        raise RuntimeError(f"queueing identifies failed: {result.statuses}, {result.failures}")


def filled(run, where: Path, count: int, phase: str) -> Path:
    db = where / "outbox.db"
    service = run.service(where, db, delivery=False)
    try:
        queue_identifies(service.port, count, phase)
    finally:
        run.stop_service(service)
    return db


def wait_tokens(standin, count: int, timeout: float, sample=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if standin.tokens_seen() >= count:
            return True
        if sample:
            sample()
        time.sleep(0.2)
    return False


def rate_of(times: list[float]) -> float:
    """Calls/s from the first arrival to the last (the first not counted)."""
    times = sorted(times)
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def ok_times(standin: SlowStandIn) -> list[float]:
    return [at for at, status, _ in standin.arrivals() if status == 200]


def window_gauges(url: str) -> dict[str, float]:
    """The Vero window's gauges from /metrics (summed over the workers)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {name: float(value) for name, value in METRIC.findall(text)}


def worker_peak_rss_mb(service: Gunicorn) -> float:
    return service.peak_worker_rss_mb()


def plain_baseline(where: Path, count: int, threads: int) -> dict:
    """The plain requests loop posting `count` identify calls to the slow stand-in."""
    from bench.harness import plain_loop

    calls = [
        [
            "POST",
            "/api/v2/users/track",
            json.dumps({"id": f"aud-{n}", "data": {"bench": bodies.token("lb", 0, n)}}),
        ]
        for n in range(count)
    ]
    requests_file = where / "baseline-calls.jsonl"
    requests_file.write_text("".join(json.dumps(call) + "\n" for call in calls))
    with SlowStandIn(str(where / "baseline-vero"), LATENCY) as target:
        plain = plain_loop(requests_file, target.url, threads)
    return {"rate": count / plain["seconds"], "errors": plain["errors"], "threads": threads}


# -- the phases ----------------------------------------------------------------


def drain(run) -> None:
    from service.config import Config

    count = sizes(run)["drain"]
    ceiling = Config().delivery_max_in_flight
    where = run.fresh("latency-drain")
    db = filled(run, where, count, "ld")
    most_window = [0.0]
    with SlowStandIn(str(where / "vero"), LATENCY) as vero:
        service = run.service(where, db, delivery=True, vero_url=vero.url)

        def sample():
            gauges = window_gauges(service.url)
            most_window[0] = max(most_window[0], gauges.get("vero_bridge_upstream_window", 0))

        try:
            complete = wait_tokens(vero, count, timeout=count / 50, sample=sample)
            peak = worker_peak_rss_mb(service)
        finally:
            run.stop_service(service)
        most_waiting = vero.most_waiting()
    rate = rate_of(ok_times(vero))

    # The same outbox against an upstream that answers at once.
    instant_where = run.fresh("latency-drain-instant")
    instant_db = filled(run, instant_where, count, "li")
    with StandIn("vero", VERO_REPLY, str(instant_where / "vero")) as instant:
        service = run.service(instant_where, instant_db, delivery=True, vero_url=instant.url)
        try:
            instant_complete = wait_tokens(instant, count, timeout=300)
        finally:
            run.stop_service(service)
    instant_rate = rate_of(list(instant.arrivals().values()))

    baseline = plain_baseline(where, count, run.delivering * ceiling)
    run.results["latency_drain"] = {
        "count": count,
        "rate": rate,
        "complete": complete,
        "most_waiting": most_waiting,
        "most_window": most_window[0],
        "peak_rss_mb": peak,
        "instant_rate": instant_rate,
        "instant_complete": instant_complete,
        "baseline": baseline,
        "ceiling": ceiling,
    }


def postgres(run) -> None:
    import psycopg

    count = sizes(run)["postgres"]
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + PG_DATABASE
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE}")
            admin.execute(f"CREATE DATABASE {PG_DATABASE}")
    except psycopg.Error as exc:
        run.results["latency_postgres"] = {"skipped": " ".join(str(exc).split())}
        return
    where = run.fresh("latency-postgres")
    try:
        with SlowStandIn(str(where / "vero"), LATENCY) as vero:
            env = {
                **run.env(where / "unused.db", delivery=False, vero_url=vero.url),
                "DATABASE_URL": url,
            }
            web = Gunicorn(env, where / "web.log").start()
            try:
                queue_identifies(web.port, count, "lp")
                worker_log = open(where / "worker.log", "ab")
                worker = subprocess.Popen(
                    [str(FLASK), "--app", "wsgi", "outbox", "deliver"],
                    cwd=ROOT,
                    env={"PATH": os.environ["PATH"], **env},
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                peak = 0.0
                try:
                    complete = wait_tokens(
                        vero,
                        count,
                        timeout=count / 30,
                        sample=lambda: None,
                    )
                    peak = _peak_rss_mb(worker.pid)
                finally:
                    worker.terminate()
                    try:
                        worker.wait(40)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait(10)
                    worker_log.close()
            finally:
                run.stop_service(web)
        rate = rate_of(ok_times(vero))
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    from service.config import Config

    run.results["latency_postgres"] = {
        "ceiling": Config().delivery_max_in_flight,
        "count": count,
        "rate": rate,
        "complete": complete,
        "worker_rss_mb": peak,
        "worker_exit": worker.returncode,
    }


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


THROTTLE_AFTER_SECONDS = 6.0
THROTTLE_SECONDS = 1.0
RETRY_AFTER_SECONDS = 3


def throttled(run) -> None:
    count = sizes(run)["throttled"]
    where = run.fresh("latency-429")
    db = filled(run, where, count, "lt")
    timeline: list[tuple[float, dict[str, float]]] = []
    with SlowStandIn(str(where / "vero"), LATENCY) as vero:
        service = run.service(where, db, delivery=True, vero_url=vero.url)
        done = threading.Event()

        def sampler():
            while not done.wait(0.2):
                timeline.append((time.time(), window_gauges(service.url)))

        thread = threading.Thread(target=sampler, daemon=True)
        try:
            wait_tokens(vero, 1, timeout=60)
            thread.start()
            time.sleep(THROTTLE_AFTER_SECONDS)
            began = vero.throttle(THROTTLE_SECONDS, RETRY_AFTER_SECONDS)
            complete = wait_tokens(vero, count, timeout=count / 50)
            done.set()
            thread.join()
        finally:
            done.set()
            run.stop_service(service)
    arrivals = vero.arrivals()
    refused = sorted(at for at, status, _ in arrivals if status == 429)
    ok = sorted(at for at, status, _ in arrivals if status == 200)
    # Each process pauses from its first 429 answer (LATENCY after the call
    # arrived) for Retry-After; every process has one within a few
    # milliseconds, as each keeps dozens of calls in flight. Measured from the
    # last of the first answers, with a margin for a call that was already
    # on its way.
    first_answer = refused[0] + LATENCY if refused else began
    quiet = (first_answer + 0.1, first_answer + RETRY_AFTER_SECONDS - 0.1)
    during = [at for at in ok + refused if quiet[0] <= at <= quiet[1]]
    window = [(at, gauges.get("vero_bridge_upstream_window", 0.0)) for at, gauges in timeline]
    before = [w for at, w in window if began - 2 <= at < began]
    ceiling = max(before, default=0.0)
    lowest = min((w for at, w in window if at >= began), default=0.0)
    resumed = first_answer + RETRY_AFTER_SECONDS
    recovered_at = next(
        (at for at, w in window if at > resumed and w >= 0.95 * ceiling and ceiling), None
    )
    rate_before = len([at for at in ok if began - 3 <= at < began]) / 3
    # Over the two seconds after the window is back (or after the pause, if
    # the queue ran dry first).
    after_start = recovered_at or resumed + 1
    rate_after = len([at for at in ok if after_start <= at < after_start + 2]) / 2
    run.results["latency_429"] = {
        "count": count,
        "complete": complete,
        "refused": len(refused),
        "quiet_seconds": quiet[1] - quiet[0],
        "calls_during_pause": len(during),
        "window_before": ceiling,
        "window_lowest": lowest,
        "recovered_after_s": (recovered_at - resumed) if recovered_at else None,
        "rate_before": rate_before,
        "rate_after": rate_after,
        "paused_until_seen": max(
            (g.get("vero_bridge_upstream_paused_until_timestamp_seconds", 0) for _, g in timeline),
            default=0.0,
        )
        > began,
    }


def ingest_while_draining(run) -> None:
    """Idle ingest (delivery off) and ingest beside the drain of one backlog,
    alternated for several rounds so that a shared machine's swings fall on
    both sides: rates pooled, p99 the worst round's."""
    from bench.harness import BASIC, run_wrk

    seconds = run.plan.ingest_seconds
    count = sizes(run)["backlog"]
    where = run.fresh("latency-ingest-draining")
    db = filled(run, where, count, "lb")
    idle, busy, spans = [], [], []
    with SlowStandIn(str(where / "vero"), LATENCY) as vero:
        for round_ in range(INGEST_ROUNDS if run.plan.rounds > 1 else 1):
            idle_where = run.fresh(f"latency-ingest-idle-{round_}")
            service = run.service(idle_where, idle_where / "outbox.db", delivery=False)
            try:
                warm = run.plan.warmup_seconds
                run_wrk(idle_where, service.url, "track", f"iw{round_}", "/v1/track", BASIC, warm)
                idle.append(
                    run_wrk(
                        idle_where, service.url, "track", f"ii{round_}", "/v1/track", BASIC, seconds
                    )
                )
            finally:
                run.stop_service(service)
            service = run.service(where, db, delivery=True, vero_url=vero.url)
            try:
                wait_tokens(vero, vero.tokens_seen() + 1, timeout=60)
                time.sleep(2)  # the window full
                run_wrk(where, service.url, "track", f"dw{round_}", "/v1/track", BASIC, warm)
                started = time.time()
                busy.append(
                    run_wrk(where, service.url, "track", f"dd{round_}", "/v1/track", BASIC, seconds)
                )
                spans.append((started, time.time()))
                still_queued = vero.tokens_seen() < count
            finally:
                run.stop_service(service)
    arrivals = ok_times(vero)
    drained = sum(1 for at in arrivals for start, end in spans if start <= at <= end)

    def pooled(runs) -> dict:
        return {
            "rate": sum(r.ok_per_second for r in runs) / len(runs),
            "p99_ms": max(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs),
            "rounds": [round(r.ok_per_second) for r in runs],
        }

    run.results["latency_ingest"] = {
        "idle": pooled(idle),
        "draining": pooled(busy),
        "drain_rate": drained / sum(end - start for start, end in spans),
        "backlog": count,
        "still_queued": still_queued,
    }


PHASES = {
    "latency_drain": drain,
    "latency_postgres": postgres,
    "latency_429": throttled,
    "latency_ingest": ingest_while_draining,
}


# -- the table -----------------------------------------------------------------


def rows(results: dict) -> list[str]:
    from bench.harness import verdict

    out = []
    if "latency_drain" in results:
        d = results["latency_drain"]
        b = d["baseline"]
        hours = AUDIENCE / d["rate"] / 3600 if d["rate"] else float("inf")
        out.append(
            f"| drain at 150 ms (SQLite, Procfile web line) | {d['rate']:,.0f} Vero calls/s "
            f"({d['count']:,} identifies; up to {d['most_waiting']} calls waiting at Vero, "
            f"window {d['most_window']:.0f}); 1,000,000 identifies in {hours * 60:.0f} min; "
            f"instant upstream: {d['instant_rate']:,.0f} calls/s | plain requests loop, "
            f"{b['threads']} threads, same stand-in: {b['rate']:,.0f} calls/s | "
            f"{d['rate'] / b['rate'] if b['rate'] else 0:.2f}x the loop | >= 500 calls/s | "
            f"{verdict(d['rate'] >= TARGET_CALLS_PER_S and d['complete'])} |"
        )
        out.append(
            f"| memory, window full | peak RSS of the largest worker while draining at 150 ms: "
            f"{d['peak_rss_mb']:.0f} MB | none | {d['peak_rss_mb']:.0f} MB | < 150 MB | "
            f"{verdict(0 < d['peak_rss_mb'] < 150)} |"
        )
    if "latency_postgres" in results:
        p = results["latency_postgres"]
        if "skipped" in p:
            out.append(
                f"| drain at 150 ms (PostgreSQL, web + worker) | skipped: {p['skipped']} |||||"
            )
        else:
            drain_rate = results.get("latency_drain", {}).get("rate", 0)
            one_window = p["ceiling"] / LATENCY
            out.append(
                f"| drain at 150 ms (PostgreSQL, web + worker) | {p['rate']:,.0f} Vero calls/s "
                f"({p['count']:,} identifies by the one `worker:` process; its peak RSS "
                f"{p['worker_rss_mb']:.0f} MB; exit {p['worker_exit']} on SIGTERM) | the SQLite "
                f"drain above (web line): {drain_rate:,.0f} calls/s | "
                f"{p['rate'] / one_window:.2f} of one window's {one_window:,.0f} calls/s | "
                f"reported (one process) | {verdict(p['complete'] and p['worker_exit'] == 0)} |"
            )
    if "latency_429" in results:
        t = results["latency_429"]
        recovered = (
            f"back to {0.95 * t['window_before']:.0f}+ {t['recovered_after_s']:.1f} s after the pause"
            if t["recovered_after_s"] is not None
            else "NOT back"
        )
        out.append(
            f"| 429 with Retry-After {RETRY_AFTER_SECONDS} s | {t['refused']} calls answered 429; "
            f"{t['calls_during_pause']} calls arrived in the {t['quiet_seconds']:.1f} s of the "
            f"pause; window {t['window_before']:.0f} -> {t['window_lowest']:.0f}, {recovered}; "
            f"{t['rate_after']:,.0f} calls/s after | before the 429s: {t['rate_before']:,.0f} "
            f"calls/s | {t['calls_during_pause']} calls during the pause | none during the "
            f"pause; window recovers | "
            f"{verdict(t['calls_during_pause'] == 0 and t['recovered_after_s'] is not None and t['complete'])} |"
        )
    if "latency_ingest" in results:
        i = results["latency_ingest"]
        idle, busy = i["idle"], i["draining"]
        ratio = busy["rate"] / idle["rate"] if idle["rate"] else 0
        out.append(
            f"| ingest while draining | {busy['rate']:,.0f} msg/s (rounds: {busy['rounds']}), "
            f"p99 {busy['p99_ms']:.1f} ms, {busy['errors']} errors, while {i['backlog']:,} queued "
            f"drain at {i['drain_rate']:,.0f} calls/s | delivery idle: {idle['rate']:,.0f} msg/s "
            f"(rounds: {idle['rounds']}), p99 {idle['p99_ms']:.1f} ms | ratio {ratio:.2f} | "
            f">= 0.7x; p99 < 50 ms | "
            f"{verdict(ratio >= 0.7 and busy['p99_ms'] < 50 and not busy['errors'] and i['still_queued'])} |"
        )
    return out
