"""One Segment message of every type direction A takes, and the Vero calls
(method, path, body without the credential) MAPPING.md A.2 says it becomes."""

from __future__ import annotations

TIMESTAMP = "2023-11-14T22:13:20Z"
CREATED_AT = 1700000000
EXTRAS = {"created_at": CREATED_AT, "source": "segment"}


def every_type(user: str = "u1") -> list[tuple[dict, list[tuple[str, str, dict]]]]:
    email = f"{user}@example.org"
    return [
        (
            {
                "type": "identify",
                "messageId": f"{user}-identify",
                "userId": user,
                "timestamp": TIMESTAMP,
                "traits": {"email": email, "plan": "pro"},
                "context": {"userAgent": "UA/1"},
            },
            [
                (
                    "POST",
                    "/users/track",
                    {
                        "id": user,
                        "email": email,
                        "data": {"email": email, "plan": "pro", "id": user, "userAgent": "UA/1"},
                    },
                )
            ],
        ),
        (
            {
                "type": "track",
                "messageId": f"{user}-track",
                "userId": user,
                "timestamp": TIMESTAMP,
                "event": "Signed Up",
                "properties": {"plan": "pro"},
                "context": {"traits": {"email": email}},
            },
            [
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user, "email": email},
                        "event_name": "Signed Up",
                        "data": {"plan": "pro"},
                        "extras": EXTRAS,
                    },
                )
            ],
        ),
        (
            {
                "type": "page",
                "messageId": f"{user}-page",
                "userId": user,
                "timestamp": TIMESTAMP,
                "name": "Pricing",
                "properties": {"path": "/pricing"},
                "context": {"page": {"url": "https://example.org/pricing"}},
            },
            [
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user},
                        "event_name": "viewed_page",
                        "data": {
                            "path": "/pricing",
                            "name": "Pricing",
                            "url": "https://example.org/pricing",
                        },
                        "extras": EXTRAS,
                    },
                )
            ],
        ),
        (
            {
                "type": "screen",
                "messageId": f"{user}-screen",
                "userId": user,
                "timestamp": TIMESTAMP,
                "name": "Home",
            },
            [
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user},
                        "event_name": "viewed_screen",
                        "data": {"name": "Home"},
                        "extras": EXTRAS,
                    },
                )
            ],
        ),
        (
            {
                "type": "group",
                "messageId": f"{user}-group",
                "userId": user,
                "timestamp": TIMESTAMP,
                "groupId": "g1",
                "traits": {"name": "Acme", "email": "team@acme.example"},
            },
            [
                (
                    "POST",
                    "/users/track",
                    {"id": user, "data": {"group": {"name": "Acme", "id": "g1"}}},
                )
            ],
        ),
        (
            {
                "type": "track",
                "messageId": f"{user}-order",
                "userId": user,
                "timestamp": TIMESTAMP,
                "event": "Order Completed",
                "properties": {"order_id": "o1", "products": [{"sku": "a"}, {"sku": "b"}]},
                "integrations": {"Vero": {"tags": {"action": "add", "values": ["buyer"]}}},
            },
            [
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user},
                        "event_name": "Ordered Product",
                        "data": {"sku": "a"},
                        "extras": EXTRAS,
                    },
                ),
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user},
                        "event_name": "Ordered Product",
                        "data": {"sku": "b"},
                        "extras": EXTRAS,
                    },
                ),
                (
                    "POST",
                    "/events/track",
                    {
                        "identity": {"id": user},
                        "event_name": "Order Completed",
                        "data": {"order_id": "o1", "products": [{"sku": "a"}, {"sku": "b"}]},
                        "extras": EXTRAS,
                    },
                ),
                ("PUT", "/users/tags/edit", {"id": user, "add": ["buyer"]}),
            ],
        ),
        (
            {
                "type": "track",
                "messageId": f"{user}-unsubscribe",
                "userId": user,
                "timestamp": TIMESTAMP,
                "event": "Unsubscribed",
            },
            [("POST", "/users/unsubscribe", {"id": user})],
        ),
        (
            {
                "type": "alias",
                "messageId": f"{user}-alias",
                "userId": user,
                "timestamp": TIMESTAMP,
                "previousId": f"anon-{user}",
            },
            [("PUT", "/users/reidentify", {"id": f"anon-{user}", "new_id": user})],
        ),
        (
            {
                "type": "delete",
                "messageId": f"{user}-delete",
                "userId": user,
                "timestamp": TIMESTAMP,
            },
            [("POST", "/users/delete", {"id": user})],
        ),
    ]


def with_credential(calls, name: str, value: str) -> list[tuple[str, str, dict]]:
    return [(method, path, {**body, name: value}) for method, path, body in calls]
