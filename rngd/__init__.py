"""rngd: a vhost-user VirtIO RNG back-end daemon on trio."""

__version__ = "0.1.0"
