"""The receive stage: the supervisor that runs a toolkit's storescp (supervisor) and the
watcher of spool/incoming/ (watch)."""
