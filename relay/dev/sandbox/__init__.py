"""A local stand-in for the Mirakl Connect API, with fault injection."""
