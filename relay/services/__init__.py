"""The proxy's other services: query and retrieve through the relay (C-FIND, C-GET, C-MOVE),
answered by the [query] destination.

    upstream.py   associations to the PACS that answers (calling AE, timeouts, TLS, nodelay)
    find.py       C-FIND: each of the PACS's matches passed on as it comes; C-CANCEL too
    retrieve.py   C-GET / C-MOVE: fetch from the PACS into spool/retrieving/, serve each object
                  as it lands (never through the routing spool)
    scp.py        the service: its presentation contexts and handlers, and the SCP on
                  [query].port (the embedded receiver binds the same handlers)
"""
