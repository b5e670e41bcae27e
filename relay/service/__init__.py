"""The service around the core: the daemon, its metrics and health, logs, and systemd's notify protocol."""
