"""The configuration: the typed model (model), TOML tables read with errors that name the file
and key (reader), and loading a relay.toml (load)."""
