"""The history: every event of the event stream, in a database the console and the API search
("where is study X?"). Written off the delivery path by a subscriber (writer.py) that batches;
SQLite at <spool>/history.sqlite by default, PostgreSQL to share one history between relays."""
