"""Training methods as plug-ins: CRL and the Circuit Breakers and RepBend baselines.

Each method is one module with its config section (`[loss.<name>]`, keys named for what they weigh)
and its loss over the captured states (crl.methods.base). `METHODS` is the registry by name; the
training config gets one section per registered method. Adding a method means adding a module with
a `Method` subclass, registering it here, and its tests.
"""

from __future__ import annotations

from crl.methods.base import Method, MethodContext, StepStates
from crl.methods.circuit_breakers import CircuitBreakersConfig, CircuitBreakersMethod
from crl.methods.crl import CRLConfig, CRLMethod
from crl.methods.repbend import RepBendConfig, RepBendMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (CRLMethod, CircuitBreakersMethod, RepBendMethod)}
"""Every training method, by the name `loss.method` takes."""


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"loss.method: expected one of {', '.join(METHODS)}, got {name!r}") from None


__all__ = [
    "METHODS", "CRLConfig", "CRLMethod", "CircuitBreakersConfig", "CircuitBreakersMethod", "Method", "MethodContext",
    "RepBendConfig", "RepBendMethod", "StepStates", "method_class",
]
