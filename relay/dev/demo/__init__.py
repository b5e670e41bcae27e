"""``outbox-relay demo``: the whole path on a throwaway PostgreSQL and the sandbox."""
