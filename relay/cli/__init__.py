"""The operator's surface: argument parsing, the operator commands, and what they print."""
