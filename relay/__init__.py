"""outbox-relay: report Mirakl Connect action outcomes exactly once, from a PostgreSQL outbox."""

__version__ = "0.1.0"
