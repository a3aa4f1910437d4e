"""The federated round: local updates, the client map over a mesh, fates, attacks,
communication cost, traced hyper-parameters, stacked runs and personalization."""
