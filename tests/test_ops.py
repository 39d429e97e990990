import json
import os
import time

from blueprints.ops import NOT_READY
from service.outbox import open_store
from service.results import Accept
from service.runtime import get_runtime
from tests.support import metric


def test_healthz_answers_while_the_process_serves(make_app):
    response = make_app().test_client().get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok"})


def test_readyz_is_ready_when_the_store_answers(make_app):
    response = make_app().test_client().get("/readyz")
    assert (response.status_code, response.json) == (200, {"status": "ready"})


def test_readyz_is_503_with_the_reason_when_the_store_cannot_be_written(make_app, tmp_path, caplog):
    # The caller is told generically (it is unauthenticated); the log says why.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    app = make_app({"DATABASE_URL": f"sqlite:///{blocker}/outbox.db"})
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "reason": NOT_READY}
    assert str(tmp_path) not in response.get_data(as_text=True)
    assert f"not ready: the SQLite outbox's folder {blocker} is missing" in caplog.messages


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


def test_readyz_is_503_while_writes_fail_though_the_probe_passes(make_app, caplog):
    app = make_app({"SEGMENT_SHARED_SECRET": "shared-secret", "VERO_AUTH_TOKEN": "vero-token"})
    client = app.test_client()
    store = get_runtime(app).store
    assert client.get("/readyz").status_code == 200

    def post(user: str):
        message = {"type": "track", "userId": user, "event": "E", "properties": {"x": "y" * 5000}}
        return client.post("/v1/track", json=message, auth=("shared-secret", ""))

    assert post("u0").status_code == 200
    # A full disk, as SQLite reports it: the file may not grow. The probe's
    # one-row update still fits; a new message does not.
    conn = store._connection()
    # Without the free pages the schema's migrations left (tables they
    # replaced), which would hold a message without growing the file.
    conn.execute("VACUUM")
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    store.check(time.time())
    assert post("u1").status_code == 503
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "reason": NOT_READY}
    assert any(
        message.startswith("not ready: recent writes failed: the SQLite outbox cannot be written")
        for message in caplog.messages
    )

    # Room again: the next write succeeds, and with it readiness.
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert post("u2").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_write_failure_counts_for_a_while_only():
    from service.health import FAILURE_SECONDS, Writes

    writes = Writes()
    writes.failed(1000.0, "disk full")
    assert writes.failing(1000.0 + FAILURE_SECONDS / 2) == "disk full"
    assert writes.failing(1000.0 + FAILURE_SECONDS) is None
    writes.failed(2000.0, "disk full")
    writes.succeeded()
    assert writes.failing(2000.0) is None


def test_repeated_slashes_are_served_not_redirected_with_the_token(make_app):
    token = "webhook-token-4f1c9b2e"
    app = make_app({"VERO_WEBHOOK_TOKEN": token, "SEGMENT_WRITE_KEY": "write-key-1"})
    webhook = {"type": "opened", "opened_at": 1, "message_id": "m", "user": {"id": "u"}}
    answer = app.test_client().post(f"/vero//webhooks//{token}", json=webhook)
    # Werkzeug would answer 308 with the token in Location and in its body.
    assert answer.status_code == 200
    assert "Location" not in answer.headers and token not in answer.get_data(as_text=True)


def test_a_request_id_that_is_a_secret_is_not_repeated(make_app):
    token = "webhook-token-4f1c9b2e"
    client = make_app({"VERO_WEBHOOK_TOKEN": token}).test_client()
    answer = client.get("/healthz", headers={"X-Request-ID": token})
    assert answer.headers["X-Request-ID"] not in ("", token)
