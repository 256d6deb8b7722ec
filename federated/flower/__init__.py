"""Flower (1.41, Message API) deployment of federated rounds.

* :mod:`federated.flower.server_app` / :mod:`federated.flower.client_app`: the ServerApp and the ClientApp
  (``flwr`` and ``torch`` are imported there, never here);
* :mod:`federated.flower.runtime`: the SuperLink and SuperNode processes and the Control API client (run
  submission and status), importable without flwr;
* :mod:`federated.flower.config`: the run configuration both sides agree on;
* ``federated/flower/app/``: the Flower App project that becomes the FAB of every run.
"""
