import json
import os
import re
import time

from service.outbox import open_store
from service.results import Accept
from service.runtime import get_runtime


def test_healthz_answers_while_the_process_serves(make_app):
    response = make_app().test_client().get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok"})


def test_readyz_is_ready_when_the_store_answers(make_app):
    response = make_app().test_client().get("/readyz")
    assert (response.status_code, response.json) == (200, {"status": "ready"})


def test_readyz_is_503_with_the_reason_when_the_store_cannot_be_written(make_app, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    app = make_app({"DATABASE_URL": f"sqlite:///{blocker}/outbox.db"})
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"
    assert "cannot open the SQLite outbox" in response.json["reason"]


def test_readyz_turns_503_when_a_working_store_breaks(make_app, tmp_path):
    path = tmp_path / "outbox.db"
    app = make_app({"DATABASE_URL": f"sqlite:///{path}"})
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    get_runtime(app).store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.remove(f"{path}{suffix}")
    os.makedirs(path)  # the file is now a folder: nothing can open or write it
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["reason"]


def test_the_request_id_is_returned_and_a_safe_given_one_kept(make_app):
    client = make_app().test_client()
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    unsafe = "<script>" * 20
    assert (
        client.get("/healthz", headers={"X-Request-ID": unsafe}).headers["X-Request-ID"] != unsafe
    )


def test_unknown_routes_and_methods_answer_json(make_app):
    client = make_app().test_client()
    assert (client.get("/nope").status_code, client.get("/nope").json) == (
        404,
        {"error": "not found"},
    )
    assert client.get("/segment").status_code == 405


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text, whatever the label order."""
    wanted = {key: str(value) for key, value in labels.items()}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        sample, _, label_text = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if sample == name and found == wanted:
            return float(value)
    return None


def test_metrics_expose_counters_and_outbox_gauges_from_the_store(make_app, sqlite_url):
    app = make_app()
    # Another process's work, written straight to the shared store, shows too.
    other = open_store(sqlite_url)
    other.enqueue(
        "segment_to_vero", [Accept("k1", "u1", {}), Accept("k2", "u2", {})], time.time() - 30
    )
    other.claim("segment_to_vero", 1, 30, time.time())
    other.close()

    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    assert (
        metric(text, "vero_bridge_outbox_items", direction="segment_to_vero", state="pending") == 1
    )
    assert (
        metric(text, "vero_bridge_outbox_items", direction="segment_to_vero", state="in_flight")
        == 1
    )
    assert metric(text, "vero_bridge_outbox_items", direction="vero_to_segment", state="dead") == 0
    age = metric(text, "vero_bridge_outbox_oldest_pending_age_seconds", direction="segment_to_vero")
    assert 29 <= age < 120
    assert metric(text, "vero_bridge_outbox_up") == 1


def test_metrics_count_requests_refused_by_direction_and_reason(make_app):
    client = make_app().test_client()
    before = (
        metric(
            client.get("/metrics").get_data(as_text=True),
            "vero_bridge_messages_rejected_total",
            direction="vero_to_segment",
            reason="not_configured",
        )
        or 0
    )
    assert client.post("/vero/webhooks/x", data=json.dumps({})).status_code == 503
    after = metric(
        client.get("/metrics").get_data(as_text=True),
        "vero_bridge_messages_rejected_total",
        direction="vero_to_segment",
        reason="not_configured",
    )
    assert after == before + 1


def test_metrics_say_when_the_store_is_down(make_app, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    app = make_app({"DATABASE_URL": f"sqlite:///{blocker}/outbox.db"})
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert metric(text, "vero_bridge_outbox_up") == 0


def test_metrics_count_accepted_messages_and_deliveries(make_app):
    from tests.senders import ScriptedSender

    app = make_app(senders=[ScriptedSender()])
    runtime = get_runtime(app)
    client = app.test_client()

    def scrape(name, **labels):
        return metric(client.get("/metrics").get_data(as_text=True), name, **labels) or 0

    accepted = scrape("vero_bridge_messages_accepted_total", direction="segment_to_vero")
    duplicate = scrape("vero_bridge_messages_duplicate_total", direction="segment_to_vero")
    delivered = scrape(
        "vero_bridge_deliveries_total", upstream="vero", result="succeeded", status_class="2xx"
    )
    runtime.accept(
        "segment_to_vero", [Accept("m1", "u1", {"key": "m1"}), Accept("m1", "u1", {"key": "m1"})]
    )
    assert runtime.deliverer.run_once("segment_to_vero") == 1
    assert (
        scrape("vero_bridge_messages_accepted_total", direction="segment_to_vero") == accepted + 1
    )
    assert (
        scrape("vero_bridge_messages_duplicate_total", direction="segment_to_vero") == duplicate + 1
    )
    assert (
        scrape(
            "vero_bridge_deliveries_total", upstream="vero", result="succeeded", status_class="2xx"
        )
        == delivered + 1
    )
