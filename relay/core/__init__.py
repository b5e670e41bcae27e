"""The delivery core: claim, mark, send, classify and record; pure policies for retries, answers and flow."""
