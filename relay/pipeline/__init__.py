"""The pipeline: the processor (claim, edit, route, publish), the running relay's life cycle
and its reload."""
