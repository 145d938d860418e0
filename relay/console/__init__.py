"""The console and the JSON API: served by `run` and `process` at [console] listen. The pages
and the API read the history and the spool, and act through the running relay."""
