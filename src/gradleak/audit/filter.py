"""The leakage audit as an update filter: it attacks the update exactly as the server would
receive it (after the defences before it in the list), compares the reconstruction with the
client's examples and with the audit's prior (RDLV), returns the result row's fields, and withholds
the update when its RDLV passes the threshold. Modality-free: the examples' input spec supplies the
metrics, the pairing cost and the rendering."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from gradleak.attacks.base import ServerView
from gradleak.audit.config import AuditConfig
from gradleak.audit.rdlv import rdlv
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.update import ClientUpdate
from gradleak.metrics import assign, score
from gradleak.modality import RENDERERS, InputSpec
from gradleak.rundir import SubDir
from gradleak.safeio import npz_bytes
from gradleak.seeding import derive_seed


class LeakageAudit:
    def __init__(
        self,
        config: AuditConfig,
        *,
        model: nn.Module,
        spec: InputSpec,
        num_classes: int,
        prior: torch.Tensor,
        out_dir: SubDir | None,
        defenses: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.attack = config.build_attack()
        self.model = copy.deepcopy(model)
        self.spec, self.num_classes = spec, num_classes
        self.prior = prior
        self.out_dir = out_dir
        self.defenses = defenses
        self.device = device

    def view(
        self, global_state: dict[str, torch.Tensor], update: ClientUpdate, labels: torch.Tensor
    ) -> ServerView:
        """What the server sees of this update (the labels only where the threat model gives
        them)."""
        return ServerView.of(
            self.model,
            global_state,
            update,
            spec=self.spec,
            num_classes=self.num_classes,
            known_labels=labels.clone() if self.attack.wants_labels else None,
        )

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        cid = ctx.client.client_id
        if not self.config.applies(ctx.round, cid):
            return Filtered(update)
        truth, labels = ctx.client.data.examples, ctx.client.data.targets
        if not all(
            torch.isfinite(v).all() for v in (*update.delta.values(), *ctx.global_state.values())
        ):
            # Training diverged (e.g. under heavy noise): there is nothing finite to invert.
            return Filtered(
                update,
                dict(
                    audited=True,
                    rdlv=None,
                    attack=self.config.preset,
                    defenses=self.defenses,
                    audit_note="update or global model not finite; not attacked",
                ),
            )
        view = self.view(ctx.global_state, update, labels)
        record = self.inspect(
            view, truth, labels, seed=derive_seed(ctx.seed, "audit", ctx.round, cid)
        )
        threshold = self.config.threshold
        leaked = threshold is not None and record["rdlv"] is not None and record["rdlv"] > threshold
        return Filtered(update, record, withhold=leaked)

    def inspect(
        self, view: ServerView, truth: torch.Tensor, labels: torch.Tensor, *, seed: int
    ) -> dict[str, Any]:
        """Attack one view, score it against the client's examples and the prior, save the examples
        (when enabled) and return the audit record: RDLV, each metric of the spec, label accuracy,
        the attack's own verdict and time."""
        base = dict(audited=True, attack=self.config.preset, defenses=self.defenses)
        reason = self.attack.applies(view)
        if reason is not None:
            return {
                **base,
                "rdlv": None,
                "audit_note": f"{self.config.preset} does not apply: {reason}",
            }
        rec = self.attack.run(view, seed=seed, prior=self.prior, device=self.device)
        extra = (
            {}
            if rec.confidence is None or not math.isfinite(rec.confidence)
            else {"confidence": rec.confidence}
        )
        if not rec.feasible or rec.examples is None:
            # The attack found the batch beyond its reach and returned nothing: the server is left
            # with its prior, whose RDLV is 0 by definition (so a sweep sees the leak stopped).
            return {
                **base,
                "rdlv": 0.0,
                "audit_note": f"infeasible: {rec.reason}",
                **extra,
                "attack_seconds": rec.seconds,
            }
        pairs = assign(
            rec.examples, truth, self.spec
        )  # one matching for every metric: linear beyond it
        leak = rdlv(
            rec.examples,
            self.prior,
            truth,
            self.spec,
            metric=self.config.metric,
            reduce=self.config.reduce,
            assignment=pairs,
        )
        s = score(rec.examples, truth, self.spec, rec.labels, labels, assignment=pairs)
        if self.config.save_images and self.out_dir is not None:
            self._save(
                view.meta.round,
                view.meta.client_id,
                truth,
                rec.examples[torch.as_tensor(leak.best)],
            )
        found = {k: v for k, v in s.summary().items() if k != "label_accuracy"}
        return dict(
            audited=True,
            rdlv=leak.value,
            **found,
            label_accuracy=s.label_accuracy,
            label_strategy=rec.label_strategy,
            attack=self.config.preset,
            **extra,
            defenses=self.defenses,
            attack_seconds=rec.seconds,
        )

    def _save(self, round: int, cid: int, truth: torch.Tensor, matched: torch.Tensor) -> None:
        """Originals, the prior and the paired reconstructions; only inside the run directory."""
        assert self.out_dir is not None
        stem = f"round_{round:04d}/client_{cid}"
        priors = (
            self.prior.expand(len(truth), *self.prior.shape[1:])
            if len(self.prior) == 1
            else self.prior
        )
        self.out_dir.write_bytes(
            f"{stem}.npz",
            npz_bytes(
                originals=truth.numpy(), priors=priors.numpy(), reconstructions=matched.numpy()
            ),
        )
        renderer = RENDERERS.get(self.spec.kind).for_spec(self.spec)
        rows = [("original", truth), ("prior", priors), ("reconstruction", matched)]
        self.out_dir.write_bytes(f"{stem}.{renderer.suffix}", renderer.file(rows))
