"""Operator commands: `flask --app wsgi outbox status|dead|replay|deliver|purge`."""

from __future__ import annotations

import json
import logging
import signal
import time

import click
from flask.cli import ScriptInfo, with_appcontext

from service.directions import DIRECTIONS
from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING, StoreError
from service.runtime import get_runtime
from service.serving import ignore_further_stops

log = logging.getLogger(__name__)

direction_option = click.option(
    "--direction", type=click.Choice(DIRECTIONS), default=None, help="Only this direction."
)


class _OutboxGroup(click.Group):
    def invoke(self, ctx: click.Context):
        # An operator's command against a store that is down (or a SQLite
        # file that cannot be opened) says why in one line, not a traceback.
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_OutboxGroup, help="Inspect and operate the durable outbox.")
@click.pass_context
def outbox(ctx: click.Context):
    ctx.call_on_close(_close_store)


def _close_store() -> None:
    # Closed here, while the interpreter still runs: a PostgreSQL pool left
    # for its finalization waits 5 s for its threads and then prints two
    # tracebacks (Python 3.13) after every command.
    # The app is loaded already (Flask loads it to find this command): this
    # is the same one.
    app = click.get_current_context().ensure_object(ScriptInfo).load_app()
    get_runtime(app).store.close()


@outbox.command(help="Counts by state and direction, and the oldest pending age.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_appcontext
def status(as_json: bool):
    store = get_runtime().store
    now = time.time()
    counts, oldest = store.counts(now), store.oldest_pending()
    rows = []
    for direction in DIRECTIONS:
        in_flight = counts.get((direction, IN_FLIGHT), 0)
        created = oldest.get(direction)
        rows.append(
            {
                "direction": direction,
                "pending": counts.get((direction, PENDING), 0),
                "in_flight": in_flight,
                "delivered": counts.get((direction, DELIVERED), 0),
                "dead": counts.get((direction, DEAD), 0),
                "oldest_pending_seconds": round(now - created, 1) if created else None,
            }
        )
    if as_json:
        click.echo(json.dumps(rows))
        return
    header = f"{'direction':<16} {'pending':>8} {'in_flight':>9} {'delivered':>9} {'dead':>6}  oldest pending"
    click.echo(header)
    for row in rows:
        age = (
            "-"
            if row["oldest_pending_seconds"] is None
            else f"{row['oldest_pending_seconds']:.0f}s"
        )
        click.echo(
            f"{row['direction']:<16} {row['pending']:>8} {row['in_flight']:>9}"
            f" {row['delivered']:>9} {row['dead']:>6}  {age}"
        )


@outbox.command(help="List dead work with the last error.")
@direction_option
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, with payloads.")
@with_appcontext
def dead(direction: str | None, limit: int, as_json: bool):
    items = get_runtime().store.dead(direction, limit)
    for item in items:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": item.id,
                        "direction": item.direction,
                        "attempts": item.attempts,
                        "error": item.error,
                        "created_at": item.created_at,
                        "payload": item.payload,
                    }
                )
            )
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item.created_at))
            click.echo(
                f"{item.id}\t{item.direction}\t{when}Z\tattempts={item.attempts}\t{item.error}"
            )
    if not items and not as_json:
        click.echo("no dead work")


@outbox.command(help="Put dead work back to pending: the given ids, or --all.")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Replay all dead work.")
@direction_option
@with_appcontext
def replay(ids: tuple[int, ...], everything: bool, direction: str | None):
    if not ids and not everything:
        raise click.UsageError("name the ids to replay, or pass --all")
    count = get_runtime().store.replay(None if everything else list(ids), direction, time.time())
    click.echo(f"replayed {count}")


@outbox.command(help="Run delivery workers in the foreground until SIGTERM or Ctrl-C.")
@click.option(
    "--once", is_flag=True, help="Deliver what is due now (none while paused), then exit."
)
@click.option(
    "--unless-in-web",
    is_flag=True,
    help="While DELIVERY_IN_WEB is on, deliver nothing and wait to be stopped"
    " (the Procfile's worker line: a runner that starts every line then has"
    " only the web processes delivering).",
)
@with_appcontext
def deliver(once: bool, unless_in_web: bool):
    runtime = get_runtime()
    deliverer = runtime.deliverer
    if unless_in_web and runtime.config.delivery_in_web:
        log.info(
            "DELIVERY_IN_WEB is on, so the web processes deliver: this worker waits to be"
            " stopped (set DELIVERY_IN_WEB=false to deliver here instead)"
        )
        # Waiting, not exiting: a Procfile runner (honcho, heroku local)
        # stops every process when one exits.
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        return
    if not deliverer.senders:
        raise click.ClickException("no direction is configured: nothing to deliver")
    if once:
        try:
            total = deliverer.drain()
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"handled {total}")
        return
    signal.signal(signal.SIGTERM, lambda *_: deliverer.request_stop())
    signal.signal(signal.SIGINT, lambda *_: deliverer.request_stop())
    runtime.start_delivery()
    deliverer.stopping.wait()
    runtime.stop_delivery()
    ignore_further_stops()  # exiting now: a repeated SIGTERM must not kill the exit


@outbox.command(help="Delete delivered work older than the retention time.")
@click.option(
    "--older-than-hours", type=float, default=None, help="Instead of OUTBOX_RETENTION_HOURS."
)
@with_appcontext
def purge(older_than_hours: float | None):
    runtime = get_runtime()
    if older_than_hours is None:
        count = runtime.purge()
    else:
        count = runtime.store.purge(time.time() - older_than_hours * 3600)
    click.echo(f"purged {count}")
