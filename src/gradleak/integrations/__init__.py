"""Audits inside the user's own federated apps, with no gradleak config.

- ``auditor``: the framework-free core (``UpdateAuditor.audit``: one update of the user's model,
  the local training facts given per call, the client's examples for scoring);
- ``auditdir``: the audit directory it writes, which ``gradleak report DIR`` reads;
- ``models``: the user's model from a factory, a class path or NVFlare's model spec;
- ``flower``: ``leakage_mod`` for any ClientApp and ``LeakageAuditStrategy`` for any Strategy
  (needs the ``flower`` extra);
- ``nvflare``: the ``RelativeDataLeakageValueFilter`` with NVFlare's argument names and the
  server-side auditor filter (needs the ``nvflare`` extra).

The framework modules are imported only when used: importing this package imports neither Flower
nor NVFlare.
"""
