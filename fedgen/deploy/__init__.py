"""Running a fedgen method outside simulation, with clients as separate processes or machines.

``flower/``: FedGen-Edge (and the methods without per-client state) on Flower's deployment
runtime (SuperLink, SuperNodes, ServerApp, ClientApp). The simulation stays the source of truth:
the deployed run executes the same client and server halves of a round
(``Algorithm.client_phase`` / ``Algorithm.server_phase``) and is checked against it.
"""
