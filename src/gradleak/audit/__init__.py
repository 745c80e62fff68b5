"""The leakage audit: attack + metric on an outgoing update, with a threshold gate."""

from gradleak.audit.config import AuditConfig
from gradleak.audit.filter import LeakageAudit
from gradleak.audit.rdlv import RDLV, rdlv

__all__ = ["RDLV", "AuditConfig", "LeakageAudit", "rdlv"]
