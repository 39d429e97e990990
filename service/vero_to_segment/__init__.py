"""Direction B: Vero webhooks become Segment track calls (webhooks, mapping, sender)."""
