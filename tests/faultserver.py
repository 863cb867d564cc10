"""The steerable release server now ships with mpota (mpota.faultserver, `mpota serve --fault`);
tests import it from here as before."""
from mpota.faultserver import Fault, FaultServer, Request  # noqa: F401
