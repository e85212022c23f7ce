"""clusterd: a Twisted event-driven compute cluster."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
DEFAULT_PORT = 7420

__all__ = ["__version__", "PROTOCOL_VERSION", "DEFAULT_PORT"]
