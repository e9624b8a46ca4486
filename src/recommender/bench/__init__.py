"""The benchmark of record: replaying sample requests against a running server."""
