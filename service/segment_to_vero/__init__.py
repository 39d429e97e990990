"""Direction A: Segment messages become Vero REST calls (mapping, then sender)."""
