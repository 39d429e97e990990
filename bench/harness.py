"""The benchmark run: every row of the table, each beside its baseline.

    bench/run [--quick] [--profile]

See bench/README.md for what each row measures and how.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import backlog, bodies, latency, paced, wrk
from bench.service import ROOT, Gunicorn, pending_depth, stop_all, stored_count
from bench.standin import SEGMENT_REPLY, VERO_REPLY, StandIn
from service import delivery_seat

OUT = ROOT / "bench" / "out"
SECRET = "bench-shared-secret"
WRITE_KEY = "bench-write-key"
WEBHOOK_TOKEN = "benchwebhooktoken"
A, B = "segment_to_vero", "vero_to_segment"
BASIC = "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()
SEGMENT_BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
CONCURRENT_SENDERS = 16
E2E_RATE = 100.0


@dataclass(frozen=True)
class Plan:
    ingest_seconds: int  # per variant and round
    rounds: int  # the single-message ingest alternates baseline and service this often
    fill: int  # items in a "full outbox"
    e2e_seconds: int
    sustained_seconds: int
    warmup_seconds: int = 2


FULL = Plan(ingest_seconds=15, rounds=2, fill=10_000, e2e_seconds=40, sustained_seconds=300)
QUICK = Plan(
    ingest_seconds=4, rounds=1, fill=2_000, e2e_seconds=8, sustained_seconds=20, warmup_seconds=1
)


class Run:
    """State shared by the phases: where files go, memory peaks, profiling."""

    def __init__(self, plan: Plan, profile: bool):
        self.plan = plan
        self.profile = profile
        self.peak_rss_mb = 0.0
        self.results: dict[str, dict] = {}
        self.counter = 0
        self.workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 2))
        # Processes that deliver on the web line: the one holding the delivery
        # seat, or every worker where there is none (service/delivery_seat.py).
        self.delivering = 1 if delivery_seat.SUPPORTED else self.workers

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = OUT / f"{self.counter:02d}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def env(
        self,
        db: Path,
        delivery: bool,
        vero_url: str = "http://127.0.0.1:9",
        segment_url: str = "http://127.0.0.1:9",
    ) -> dict[str, str]:
        return {
            "VERO_AUTH_TOKEN": "bench-vero-token",
            "VERO_API_URL": vero_url + "/api/v2",
            "SEGMENT_SHARED_SECRET": SECRET,
            "SEGMENT_WRITE_KEY": WRITE_KEY,
            "SEGMENT_API_URL": segment_url + "/v1",
            "VERO_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "DATABASE_URL": f"sqlite:///{db}",
            "DELIVERY_IN_WEB": "true" if delivery else "false",
            "WEB_CONCURRENCY": str(self.workers),
        }

    def service(self, where: Path, db: Path, delivery: bool, **urls: str) -> Gunicorn:
        return Gunicorn(self.env(db, delivery, **urls), where / "service.log").start()

    def stop_service(self, service: Gunicorn) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, service.peak_worker_rss_mb())
        service.stop()


# -- profiling -----------------------------------------------------------------


class Profiler:
    """py-spy on every worker of a gunicorn while a phase runs (--profile)."""

    def __init__(self, run: Run, name: str, service: Gunicorn):
        self.procs = []
        if not run.profile:
            return
        spy = Path(sys.executable).with_name("py-spy")
        for pid in service.worker_pids():
            output = OUT / "profile" / f"{name}-{pid}.txt"
            output.parent.mkdir(exist_ok=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        str(spy),
                        "record",
                        "--pid",
                        str(pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--output",
                        str(output),
                        "--duration",
                        "600",
                        # Only samples holding the GIL: where the CPU goes, not the waiting.
                        *(["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- helpers -------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_wrk(
    where: Path,
    url: str,
    kind: str,
    phase: str,
    path: str,
    auth: str,
    seconds: int,
    per_request: int = 1,
) -> wrk.WrkResult:
    script = wrk.script(str(where), kind, phase, path, auth, per_request)
    return wrk.run(url + path, script, CONCURRENT_SENDERS, seconds)


def fill_outbox(url_port: int, direction: str, count: int, phase: str) -> None:
    """Queue `count` distinct messages, 100 per request, and check all were accepted."""
    per_request = 100
    if direction == A:
        path, headers = "/v1/batch", {"Content-Type": "application/json", "Authorization": BASIC}
    else:
        path, headers = f"/vero/webhooks/{WEBHOOK_TOKEN}", {"Content-Type": "application/json"}

    def build(i: int):
        numbered = [
            (bodies.token(phase, 0, n), n) for n in range(i * per_request, (i + 1) * per_request)
        ]
        if direction == A:
            body = bodies.batch(numbered)
        else:
            body = [bodies.webhook(tok, n) for tok, n in numbered]
        return path, bodies.encode(body), [tok for tok, _ in numbered]

    requests_needed = count // per_request
    # A rate no fill reaches: paced.run then sends as fast as answers come.
    result = paced.run(url_port, headers, build, rate=1e6, seconds=requests_needed / 1e6, threads=4)
    if result.errors or len(result.acked) != count:
        raise RuntimeError(
            f"filling the outbox failed: {result.statuses}, {result.failures} failures"
        )


def wait_for(standin: StandIn, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if standin.tokens_seen() >= count:
            return True
        time.sleep(0.05)
    return False


def delivery_rate(arrivals: dict[str, float], prefix: str) -> tuple[int, float]:
    """(messages, messages/s) from the first arrival to the last. The clock
    starts at the first arrival, so the messages that arrived with it (a whole
    batch, for Segment) are not counted in the rate."""
    times = sorted(at for token, at in arrivals.items() if token.startswith(prefix))
    after_first = [at for at in times if at > times[0]] if times else []
    if not after_first:
        return len(times), 0.0
    return len(times), len(after_first) / (times[-1] - times[0])


def plain_loop(requests_file: Path, base_url: str, threads: int, auth: str | None = None) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.plain_sender",
        str(requests_file),
        base_url,
        str(threads),
    ]
    if auth:
        command.append(auth)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"plain sender failed: {done.stderr}")
    return json.loads(done.stdout)


# -- the phases ----------------------------------------------------------------


def standin_capacity(run: Run) -> None:
    """wrk straight at a stand-in: what it can take when nothing else runs."""
    where = run.fresh("standin-capacity")
    with StandIn("vero", VERO_REPLY, str(where / "vero")) as vero:
        result = run_wrk(
            where,
            vero.url,
            "track",
            "cap",
            "/api/v2/events/track",
            "",
            max(run.plan.ingest_seconds // 2, 3),
        )
    run.results["standin"] = {"requests_per_s": result.ok_per_second, "errors": result.errors}


def ingest_single(run: Run) -> None:
    service_runs, baseline_runs = [], []
    for round_ in range(run.plan.rounds):
        where = run.fresh(f"ingest-single-baseline-{round_}")
        baseline = Gunicorn(
            run.env(where / "unused.db", False),
            where / "baseline.log",
            app="bench.baseline_app:app",
            config="bench/baseline_gunicorn.py",
        ).start()
        try:
            run_wrk(
                where,
                baseline.url,
                "track",
                f"bw{round_}",
                "/v1/track",
                BASIC,
                run.plan.warmup_seconds,
            )
            baseline_runs.append(
                run_wrk(
                    where,
                    baseline.url,
                    "track",
                    f"bs{round_}",
                    "/v1/track",
                    BASIC,
                    run.plan.ingest_seconds,
                )
            )
        finally:
            baseline.stop()

        where = run.fresh(f"ingest-single-service-{round_}")
        db = where / "outbox.db"
        service = run.service(where, db, delivery=False)
        try:
            run_wrk(
                where,
                service.url,
                "track",
                f"sw{round_}",
                "/v1/track",
                BASIC,
                run.plan.warmup_seconds,
            )
            profiler = Profiler(run, f"ingest-single-{round_}", service)
            result = run_wrk(
                where,
                service.url,
                "track",
                f"ss{round_}",
                "/v1/track",
                BASIC,
                run.plan.ingest_seconds,
            )
            profiler.stop()
            service_runs.append(result)
        finally:
            run.stop_service(service)
        result.stored = stored_count(str(db), A)  # type: ignore[attr-defined]

    def combined(results: list[wrk.WrkResult]) -> dict:
        ok = sum(r.requests - r.errors for r in results)
        return {
            "rate": ok / sum(r.seconds for r in results),
            "errors": sum(r.errors for r in results),
            "p50_ms": statistics.median(r.p50_ms for r in results),
            "p99_ms": max(r.p99_ms for r in results),
        }

    run.results["ingest_single"] = {
        "service": combined(service_runs),
        "baseline": combined(baseline_runs),
    }


def ingest_batch(run: Run) -> None:
    where = run.fresh("ingest-batch")
    service = run.service(where, where / "outbox.db", delivery=False)
    try:
        run_wrk(
            where, service.url, "batch", "bbw", "/v1/batch", BASIC, run.plan.warmup_seconds, 100
        )
        profiler = Profiler(run, "ingest-batch", service)
        result = run_wrk(
            where, service.url, "batch", "bb", "/v1/batch", BASIC, run.plan.ingest_seconds, 100
        )
        profiler.stop()
    finally:
        run.stop_service(service)
    run.results["ingest_batch"] = {
        "rate": result.ok_per_second * 100,
        "errors": result.errors,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }


def deliver_from_full_outbox(
    run: Run, direction: str, name: str, phase: str, reply: bytes, upstream: str
) -> tuple[StandIn, dict]:
    """Fill the outbox with delivery off, then restart with it on and time the
    stand-in's arrivals. Returns the stopped stand-in (for its captured requests)."""
    where = run.fresh(name)
    db = where / "outbox.db"
    service = run.service(where, db, delivery=False)
    try:
        fill_outbox(service.port, direction, run.plan.fill, phase)
    finally:
        run.stop_service(service)
    standin = StandIn(upstream, reply, str(where / upstream), capture=True)
    try:
        urls = {"vero_url": standin.url} if direction == A else {"segment_url": standin.url}
        service = run.service(where, db, delivery=True, **urls)
        profiler = Profiler(run, name, service)
        try:
            arrived_all = wait_for(standin, run.plan.fill, timeout=300)
        finally:
            profiler.stop()
            run.stop_service(service)
    finally:
        standin.stop()
    delivered, rate = delivery_rate(standin.arrivals(), f"bk_{phase}_")
    return standin, {
        "rate": rate,
        "delivered": delivered,
        "complete": arrived_all,
        "requests": standin.requests_seen(),
    }


def deliver_a(run: Run) -> None:
    standin, measured = deliver_from_full_outbox(run, A, "deliver-a", "da", VERO_REPLY, "vero")
    from service.config import Config
    from service.segment_to_vero.sender import VeroSender

    threads = run.delivering * VeroSender(Config(vero_auth_token="x")).max_in_flight
    calls = standin.captured()
    requests_file = Path(standin.out_dir) / "replay.jsonl"
    requests_file.write_text("".join(json.dumps(call) + "\n" for call in calls))
    with StandIn(
        "vero-baseline", VERO_REPLY, str(Path(standin.out_dir).with_name("vero-baseline"))
    ) as target:
        plain = plain_loop(requests_file, target.url, threads)
        messages = target.tokens_seen()
    measured["threads"] = threads
    run.results["deliver_a"] = {
        "service": measured,
        "baseline": {"rate": messages / plain["seconds"], "errors": plain["errors"]},
    }


def ingest_b(run: Run) -> None:
    where = run.fresh("ingest-b")
    service = run.service(where, where / "outbox.db", delivery=False)
    path = f"/vero/webhooks/{WEBHOOK_TOKEN}"
    try:
        run_wrk(where, service.url, "webhook", "wbw", path, "", run.plan.warmup_seconds)
        profiler = Profiler(run, "ingest-b", service)
        result = run_wrk(where, service.url, "webhook", "wb", path, "", run.plan.ingest_seconds)
        profiler.stop()
    finally:
        run.stop_service(service)
    run.results["ingest_b"] = {
        "rate": result.ok_per_second,
        "errors": result.errors,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }


def deliver_b(run: Run) -> None:
    standin, measured = deliver_from_full_outbox(
        run, B, "deliver-b", "db", SEGMENT_REPLY, "segment"
    )
    from service.config import Config
    from service.vero_to_segment.sender import SegmentSender

    threads = run.delivering * SegmentSender(Config(segment_write_key="x")).max_in_flight
    singles = [
        ["POST", "/v1/track", json.dumps(message)]
        for _, _, body in standin.captured()
        for message in json.loads(body)["batch"]
    ]
    requests_file = Path(standin.out_dir) / "replay.jsonl"
    requests_file.write_text("".join(json.dumps(call) + "\n" for call in singles))
    with StandIn(
        "segment-baseline", SEGMENT_REPLY, str(Path(standin.out_dir).with_name("segment-baseline"))
    ) as target:
        plain = plain_loop(requests_file, target.url, threads, SEGMENT_BASIC)
        messages = target.tokens_seen()
    measured["threads"] = threads
    run.results["deliver_b"] = {
        "service": measured,
        "baseline": {"rate": messages / plain["seconds"], "errors": plain["errors"]},
    }


def track_builder(phase: str, sender: int):
    def build(i: int):
        tok = bodies.token(phase, sender, i)
        return "/v1/track", bodies.encode(bodies.track(tok, i)), [tok]

    return build


def webhook_builder(phase: str, sender: int):
    def build(i: int):
        tok = bodies.token(phase, sender, i)
        return f"/vero/webhooks/{WEBHOOK_TOKEN}", bodies.encode(bodies.webhook(tok, i)), [tok]

    return build


A_HEADERS = {"Content-Type": "application/json", "Authorization": BASIC}
B_HEADERS = {"Content-Type": "application/json"}


def end_to_end(run: Run) -> None:
    where = run.fresh("end-to-end")
    with (
        StandIn("vero", VERO_REPLY, str(where / "vero")) as vero,
        StandIn("segment", SEGMENT_REPLY, str(where / "segment")) as segment,
    ):
        service = run.service(
            where, where / "outbox.db", delivery=True, vero_url=vero.url, segment_url=segment.url
        )
        try:
            sent = paced.run(
                service.port, A_HEADERS, track_builder("ee", 1), E2E_RATE, run.plan.e2e_seconds
            )
            wait_for(vero, len(sent.acked), timeout=60)
        finally:
            run.stop_service(service)
    arrivals = vero.arrivals()
    latencies = [
        (arrivals[tok] - acked) * 1000 for tok, acked in sent.acked.items() if tok in arrivals
    ]
    run.results["end_to_end"] = {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "acked": len(sent.acked),
        "missing": len(sent.acked) - len(latencies),
        "errors": sent.errors,
        "late": sent.late,
    }


def capacity(ingest: float, deliver: float) -> float:
    """Steady-state messages/s one direction alone could sustain: each message
    costs its share of ingest and of delivery on the same cores."""
    return 1 / (1 / ingest + 1 / deliver) if ingest > 0 and deliver > 0 else 0.0


def sustained(run: Run) -> None:
    r = run.results
    capacity_a = capacity(r["ingest_single"]["service"]["rate"], r["deliver_a"]["service"]["rate"])
    capacity_b = capacity(r["ingest_b"]["rate"], r["deliver_b"]["service"]["rate"])
    # Half the capacity in all, shared equally by the two directions.
    rate_a, rate_b = capacity_a / 4, capacity_b / 4
    seconds = run.plan.sustained_seconds
    where = run.fresh("sustained")
    db = where / "outbox.db"
    depths: list[tuple[float, int]] = []
    done = threading.Event()

    def sample_depth():
        started = time.monotonic()
        while not done.wait(2.0):
            depths.append((time.monotonic() - started, sum(pending_depth(str(db)).values())))

    with (
        StandIn("vero", VERO_REPLY, str(where / "vero")) as vero,
        StandIn("segment", SEGMENT_REPLY, str(where / "segment")) as segment,
    ):
        service = run.service(where, db, delivery=True, vero_url=vero.url, segment_url=segment.url)
        try:
            sampler = threading.Thread(target=sample_depth, daemon=True)
            sampler.start()
            results = {}
            senders = [
                threading.Thread(
                    target=lambda: results.__setitem__(
                        A,
                        paced.run(
                            service.port,
                            A_HEADERS,
                            track_builder("sa", 2),
                            rate_a,
                            seconds,
                            threads=8,
                        ),
                    )
                ),
                threading.Thread(
                    target=lambda: results.__setitem__(
                        B,
                        paced.run(
                            service.port,
                            B_HEADERS,
                            webhook_builder("sb", 3),
                            rate_b,
                            seconds,
                            threads=8,
                        ),
                    )
                ),
            ]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            drained = wait_for(vero, len(results[A].acked), 60) and wait_for(
                segment, len(results[B].acked), 60
            )
            done.set()
            sampler.join()
        finally:
            run.stop_service(service)
    lost_a = set(results[A].acked) - set(vero.arrivals())
    lost_b = set(results[B].acked) - set(segment.arrivals())
    loaded = [depth for at, depth in depths if at <= seconds]
    run.results["sustained"] = {
        "seconds": seconds,
        "rate_a": rate_a,
        "rate_b": rate_b,
        "acked_a": len(results[A].acked),
        "acked_b": len(results[B].acked),
        "errors": results[A].errors + results[B].errors,
        "lost": len(lost_a) + len(lost_b),
        "max_depth": max(loaded, default=0),
        "depth_last_third": max(
            (d for at, d in depths if 2 * seconds / 3 <= at <= seconds), default=0
        ),
        "drained": drained,
        "late": results[A].late + results[B].late,
        "p99_answer_ms": percentile(results[A].latencies + results[B].latencies, 99) * 1000,
    }


# -- the table -----------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(run: Run) -> str:
    r = run.results
    rows = [
        "| row | measured | baseline (same run) | result | target | |",
        "|---|---|---|---|---|---|",
    ]
    if "standin" in r:
        s = r["standin"]
        rows.append(
            f"| stand-in capacity (check) | {s['requests_per_s']:,.0f} req/s, wrk alone, "
            f"{s['errors']} errors | - | must exceed every delivery rate below | - | - |"
        )
    if "ingest_single" in r:
        s, b = r["ingest_single"]["service"], r["ingest_single"]["baseline"]
        ratio = s["rate"] / b["rate"] if b["rate"] else 0
        rows.append(
            f"| ingest A, single messages | {s['rate']:,.0f} msg/s; p50 {s['p50_ms']:.1f} ms, "
            f"p99 {s['p99_ms']:.1f} ms; {s['errors']} errors | minimal Flask route: {b['rate']:,.0f} msg/s, "
            f"p99 {b['p99_ms']:.1f} ms | ratio {ratio:.2f} | ratio >= 0.6; p99 < 50 ms | "
            f"{verdict(ratio >= 0.6 and s['p99_ms'] < 50 and not s['errors'])} |"
        )
    if "ingest_batch" in r and "ingest_single" in r:
        s, single = r["ingest_batch"], r["ingest_single"]["service"]["rate"]
        ratio = s["rate"] / single if single else 0
        rows.append(
            f"| ingest A, batches of 100 | {s['rate']:,.0f} msg/s; p99 {s['p99_ms']:.0f} ms per batch; "
            f"{s['errors']} errors | ingest A single: {single:,.0f} msg/s | {ratio:.1f}x | >= 10x | "
            f"{verdict(ratio >= 10 and not s['errors'])} |"
        )
    if "deliver_a" in r:
        s, b = r["deliver_a"]["service"], r["deliver_a"]["baseline"]
        ratio = s["rate"] / b["rate"] if b["rate"] else 0
        rows.append(
            f"| deliver A | {s['rate']:,.0f} msg/s ({s['delivered']:,} from a full outbox, "
            f"{s['threads']} threads) | plain requests.Session loop, {s['threads']} threads: "
            f"{b['rate']:,.0f} msg/s | ratio {ratio:.2f} | ratio >= 0.7 | "
            f"{verdict(ratio >= 0.7 and s['complete'])} |"
        )
    if "ingest_b" in r and "deliver_b" in r:
        i, s, b = r["ingest_b"], r["deliver_b"]["service"], r["deliver_b"]["baseline"]
        ratio = s["rate"] / b["rate"] if b["rate"] else 0
        rows.append(
            f"| ingest + deliver B | ingest {i['rate']:,.0f} webhooks/s (p99 {i['p99_ms']:.1f} ms, "
            f"{i['errors']} errors); delivery {s['rate']:,.0f} msg/s ({s['delivered']:,} in "
            f"{s['requests']} batch requests) | one Segment request per message, {s['threads']} "
            f"threads: {b['rate']:,.0f} msg/s | delivery {ratio:.1f}x | delivery >= 10x | "
            f"{verdict(ratio >= 10 and s['complete'])} |"
        )
    if "end_to_end" in r:
        s = r["end_to_end"]
        rows.append(
            f"| end to end | p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms from acknowledgement "
            f"to arrival at {E2E_RATE:.0f} msg/s ({s['acked']:,} messages, {s['missing']} missing, "
            f"{s['errors']} errors) | none | p99 {s['p99_ms']:.0f} ms | p99 < 250 ms | "
            f"{verdict(s['p99_ms'] < 250 and not s['missing'] and not s['errors'])} |"
        )
    rows.extend(latency.rows(r))
    rows.append(
        f"| memory | peak RSS of the largest gunicorn worker over all service runs: "
        f"{run.peak_rss_mb:.0f} MB | none | {run.peak_rss_mb:.0f} MB | < 150 MB | "
        f"{verdict(0 < run.peak_rss_mb < 150)} |"
    )
    if "sustained" in r:
        s = r["sustained"]
        ok = (
            not s["errors"]
            and not s["lost"]
            and s["drained"]
            and s["depth_last_third"] <= max(s["max_depth"], 1)
        )
        bounded = s["max_depth"] <= 5 * (s["rate_a"] + s["rate_b"])
        rows.append(
            f"| sustained | {s['seconds'] / 60:.1f} min at A {s['rate_a']:.0f} + B {s['rate_b']:.0f} msg/s: "
            f"{s['acked_a'] + s['acked_b']:,} acknowledged, {s['errors']} error answers, "
            f"{s['lost']} lost, outbox depth max {s['max_depth']} (last third max "
            f"{s['depth_last_third']}), answer p99 {s['p99_answer_ms']:.0f} ms | none | "
            f"{'bounded' if bounded else 'grew'}, {'drained' if s['drained'] else 'NOT drained'} | "
            f"no errors, depth bounded, nothing lost | {verdict(ok and bounded)} |"
        )
    rows += backlog.rows(r.get("backlog", {}))
    return "\n".join(rows)


PHASES = {
    "standin": standin_capacity,
    "ingest_single": ingest_single,
    "ingest_batch": ingest_batch,
    "deliver_a": deliver_a,
    "ingest_b": ingest_b,
    "deliver_b": deliver_b,
    "end_to_end": end_to_end,
    "sustained": sustained,
    **latency.PHASES,
    "backlog": backlog.phase,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the service (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="short durations and small counts")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the workers into bench/out/profile"
    )
    parser.add_argument("--only", nargs="+", choices=list(PHASES), help="run only these phases")
    parser.add_argument("--skip-million", action="store_true", help="backlog rows up to 100,000")
    args = parser.parse_args(argv)
    run = Run(QUICK if args.quick else FULL, args.profile)
    run.skip_million = args.skip_million or args.quick  # type: ignore[attr-defined]
    OUT.mkdir(parents=True, exist_ok=True)
    if args.profile:
        shutil.rmtree(OUT / "profile", ignore_errors=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    try:
        for name, phase in PHASES.items():
            if args.only and name not in args.only:
                continue
            print(f"[{time.monotonic() - started:6.0f}s] {name} ...", file=sys.stderr, flush=True)
            phase(run)
            (OUT / "results.json").write_text(json.dumps(run.results, indent=2, default=str))
    finally:
        stop_all()
    text = table(run)
    command = (
        "bench/run" + (" --quick" if args.quick else "") + (" --profile" if args.profile else "")
    )
    (OUT / "results.md").write_text(f"`{command}` ({time.monotonic() - started:.0f} s)\n\n{text}\n")
    print(text)
    print(f"\n{command}: {time.monotonic() - started:.0f} s; files in {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
