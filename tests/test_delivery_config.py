"""The delivery settings: DELIVERY_MAX_IN_FLIGHT and VERO_MAX_REQUESTS_PER_SECOND
(SERVICE.md), read and checked with the rest of the configuration, and what
the senders make of them."""

from __future__ import annotations

import pytest

from service.config import Config, ConfigError
from service.segment_to_vero.sender import VeroSender
from service.vero_to_segment.sender import MAX_REQUESTS_IN_FLIGHT, SegmentSender

CONFIGURED = {"VERO_AUTH_TOKEN": "t", "SEGMENT_WRITE_KEY": "wk"}


def test_by_default_the_window_holds_96_calls_and_vero_has_no_rate_cap():
    config = Config.from_env(CONFIGURED)
    assert (config.delivery_max_in_flight, config.vero_max_requests_per_second) == (96, None)
    vero = VeroSender(config)
    assert (vero.max_in_flight, vero.calls_per_second) == (96, None)
    # Each Segment request carries hundreds of messages: a few in flight suffice.
    assert SegmentSender(config).max_in_flight == MAX_REQUESTS_IN_FLIGHT


def test_the_settings_are_read_and_given_to_the_senders():
    config = Config.from_env(
        {**CONFIGURED, "DELIVERY_MAX_IN_FLIGHT": "4", "VERO_MAX_REQUESTS_PER_SECOND": "2.5"}
    )
    assert (config.delivery_max_in_flight, config.vero_max_requests_per_second) == (4, 2.5)
    assert (VeroSender(config).max_in_flight, VeroSender(config).calls_per_second) == (4, 2.5)
    assert SegmentSender(config).max_in_flight == 4


@pytest.mark.parametrize(
    "env",
    [
        {"DELIVERY_MAX_IN_FLIGHT": "0"},
        {"DELIVERY_MAX_IN_FLIGHT": "1001"},
        {"DELIVERY_MAX_IN_FLIGHT": "many"},
        {"VERO_MAX_REQUESTS_PER_SECOND": "0"},
        {"VERO_MAX_REQUESTS_PER_SECOND": "-1"},
        {"VERO_MAX_REQUESTS_PER_SECOND": "fast"},
        {"VERO_MAX_REQUESTS_PER_SECOND": "inf"},
    ],
)
def test_an_invalid_delivery_setting_names_its_variable(env):
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert str(raised.value).startswith(next(iter(env)) + ":")
