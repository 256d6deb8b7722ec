"""The MQTT broker side of the control plane: broker accounts and ACLs of devices, and the embedded broker.

Backends of :class:`BrokerAuth`:

* :class:`NoBrokerAuth`: the broker does its own authentication (or none: a development mosquitto);
* :class:`MosquittoDynsecAuth`: mosquitto 2 with the dynamic-security plugin (production);
* :class:`EmbeddedBrokerAuth`: the embedded amqtt broker (:class:`EmbeddedBroker`), over a credentials database.
"""

from __future__ import annotations

from ._auth import RESERVED_PREFIX, BrokerAuth, NoBrokerAuth, is_reserved
from ._client_ids import client_id_secret
from ._credentials import CredentialsFile, EmbeddedBrokerAuth
from ._dynsec import MosquittoDynsecAuth
from ._embedded import EmbeddedBroker, free_port
from ._errors import BrokerAuthError
from ._passwords import hash_password, hash_password_pbkdf2, hash_secret, verify_password

__all__ = [
    "RESERVED_PREFIX",
    "BrokerAuth",
    "BrokerAuthError",
    "CredentialsFile",
    "EmbeddedBroker",
    "EmbeddedBrokerAuth",
    "MosquittoDynsecAuth",
    "NoBrokerAuth",
    "client_id_secret",
    "free_port",
    "hash_password",
    "hash_password_pbkdf2",
    "hash_secret",
    "is_reserved",
    "verify_password",
]
