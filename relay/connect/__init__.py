"""The HTTP edge: one exchange with the Mirakl Connect API, its client and its credentials."""
