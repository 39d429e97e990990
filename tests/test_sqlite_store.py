"""What is special to the SQLite outbox (the semantics both stores share are in
test_outbox.py and test_outbox_heads.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from service.outbox import StoreError, open_store


def test_a_missing_folder_is_reported_not_created(tmp_path):
    missing = tmp_path / "not-mounted" / "data"
    store = open_store(f"sqlite:///{missing}/outbox.db")
    try:
        with pytest.raises(StoreError, match=f"the folder {missing} does not exist"):
            store.check(time.time())
    finally:
        store.close()
    assert not (tmp_path / "not-mounted").exists()


def test_moving_an_item_to_history_writes_no_index_of_keys(tmp_path):
    # De-duplication keys are random (messageIds): an index on them is written
    # anywhere in it, so they live in outbox_keys alone, written at enqueue.
    store = open_store(f"sqlite:///{tmp_path}/outbox.db")
    store.check(time.time())
    store.close()
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        for table in ("outbox", "outbox_history"):
            indexes = conn.execute(f"PRAGMA index_list({table})").fetchall()
            assert [name for _, name, unique, *_ in indexes if unique] == [], table
            columns = {
                row[2]
                for _, name, *_ in indexes
                for row in conn.execute(f"PRAGMA index_info({name})")
            }
            assert "dedup_key" not in columns, table
        ((key,),) = conn.execute(
            "SELECT group_concat(name) FROM pragma_index_info("
            " (SELECT name FROM pragma_index_list('outbox_keys') WHERE origin = 'pk'))"
        ).fetchall()
        assert key == "direction,dedup_key"
