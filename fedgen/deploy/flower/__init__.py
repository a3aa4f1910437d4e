"""fedgen on Flower's deployment runtime (flwr 1.42; the optional ``flower`` extra).

    wire.py        pytrees <-> ArrayRecords, and the bytes a message puts on the wire
    spec.py        the run's options, the node config, the deployable methods, message names
    client_app.py  the ClientApp: one client's ``client_phase`` on its own data
    personal.py    per-client persistent rows (Ditto, FedSA, local-only) on the client's node
    exchange.py    the roster (client id -> node) and one round's messages, with dropouts
    server_app.py  the ServerApp: sampling, ``server_phase``, evaluation, files, resume
    cluster.py     SuperLink, SuperNodes and ``flwr run`` as processes on this machine

Only this package (and experiments/deploy.py, tests/test_deploy.py) imports ``flwr``.
"""
