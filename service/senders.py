"""The senders for the directions this deployment has configured."""
from __future__ import annotations

from service.config import Config
from service.outbox.delivery import Sender


def default_senders(config: Config) -> list[Sender]:
    senders: list[Sender] = []
    if config.vero_enabled:
        from service.vero_client import VeroSender

        senders.append(VeroSender(config))
    if config.segment_enabled:
        from service.segment_client import SegmentSender

        senders.append(SegmentSender(config))
    return senders
