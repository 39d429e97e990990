"""What is special to the SQLite outbox (the semantics both stores share are in
test_outbox.py and test_outbox_heads.py)."""

from __future__ import annotations

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
