"""The PostgreSQL edge: named queries, the store, migrations, and the Python API for writers."""
