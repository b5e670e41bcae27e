"""Development tooling: a sandbox API, a throwaway PostgreSQL and the demo. The daemon never imports it."""
