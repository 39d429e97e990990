"""The package's name and version, as Segment's `context.library` reports them."""

from importlib import metadata

NAME = "vero-bridge"
try:
    VERSION = metadata.version(NAME)
except metadata.PackageNotFoundError:  # running from a bare checkout
    VERSION = "0.0.0+source"
