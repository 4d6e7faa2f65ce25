"""Open cloud connector: reach allow-listed on-premise services from the cloud through a tunnel."""

__version__ = "0.1.0"
