"""Policies: the category rules releases obey, the ingest rules data obeys, their checks and diffs."""
