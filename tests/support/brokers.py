"""Which brokers a module's network runs on.

Modules whose subject is the broker or the wire (identity, signatures, TLS, restarts, the shared e2e
federation) run on both. Modules whose subject is the node's own behaviour (sandbox, DP policy, device
choice, loader arguments...) exercise the broker only as transport: they run on one, and the suite
spreads them over both so each broker carries a share of every kind of traffic. Running all of them on
both doubled the suite past its 15-minute budget (2026-11-30: 942 tests).
"""

from __future__ import annotations

import pytest

EMBEDDED = "embedded"
MOSQUITTO = pytest.param("mosquitto", marks=pytest.mark.mosquitto)
BOTH = [EMBEDDED, MOSQUITTO]
