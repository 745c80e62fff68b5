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

from gradleak.attacks.base import Attack, ServerView
from gradleak.audit.config import AuditConfig
from gradleak.audit.rdlv import rdlv
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.knowledge import Known, StatisticsWithheld
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
        secure_aggregation: bool = False,
    ) -> None:
        """``secure_aggregation``: the server sees only round sums (``aggregation.strategy:
        secure-sum``); the audit then says what it assumes (``audit_assumes``)."""
        self.config = config
        self.attack = config.build_attack()
        # the configured attack first, then the others it names (``also``), each by its name
        self.attacks: dict[str, Attack] = {config.preset: self.attack, **config.build_others()}
        # attack name -> (its adaptive counterpart's name, the counterpart), run under a defence
        self.adaptive = config.build_adaptive() if config.adaptive else {}
        self.secure_aggregation = secure_aggregation
        self.model = copy.deepcopy(model)
        self.spec, self.num_classes = spec, num_classes
        self.prior = prior
        self.out_dir = out_dir
        self.defenses = defenses
        self.device = device

    def view(
        self,
        global_state: dict[str, torch.Tensor],
        update: ClientUpdate,
        labels: torch.Tensor,
        known: tuple[Known, ...] = (),
    ) -> ServerView:
        """What the server sees of this update (the labels only where the threat model gives
        them), and what it knows of the defences that the filters before the audit applied."""
        attacks = [*self.attacks.values(), *(a for _, a in self.adaptive.values())]
        return ServerView.of(
            self.model,
            global_state,
            update,
            spec=self.spec,
            num_classes=self.num_classes,
            known_labels=labels.clone() if any(a.wants_labels for a in attacks) else None,
            known_defenses=known,
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
        view = self.view(ctx.global_state, update, labels, ctx.known)
        record = self.inspect(
            view, truth, labels, seed=derive_seed(ctx.seed, "audit", ctx.round, cid)
        )
        threshold = self.config.threshold
        leaked = threshold is not None and record["rdlv"] is not None and record["rdlv"] > threshold
        return Filtered(update, record, withhold=leaked)

    def inspect(
        self, view: ServerView, truth: torch.Tensor, labels: torch.Tensor, *, seed: int
    ) -> dict[str, Any]:
        """Run every configured attack that applies to the view, score each against the client's
        examples and the prior, and return the audit record of the worst (the highest RDLV): its
        RDLV, each metric of the spec, label accuracy, its own verdict and time, which attack it
        was, and every attack's RDLV (None: it did not apply; 0: it declared the batch beyond its
        reach, which leaves the server its prior). The worst reconstruction is saved (when
        enabled)."""
        record, matched = self.examine(view, truth, labels, seed=seed)
        if matched is not None and self.config.save_images and self.out_dir is not None:
            self._save(view.meta.round, view.meta.client_id, truth, matched)
        return record

    def examine(
        self, view: ServerView, truth: torch.Tensor, labels: torch.Tensor, *, seed: int
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """``inspect`` without saving: the record and the worst attack's reconstructions paired
        with the originals (None: it produced none), for a caller that stores them its own way."""
        found: dict[str, tuple[dict[str, Any], torch.Tensor | None]] = {}
        for name, attack in self.attacks.items():
            found[name] = self._attack(name, attack, view, truth, labels, seed)
            if view.known_defenses and name in self.adaptive:
                adaptive, counterpart = self.adaptive[name]
                found[adaptive] = self._adapted(name, adaptive, counterpart, found[name], view)
                if found[adaptive] is None:
                    found[adaptive] = self._attack(adaptive, counterpart, view, truth, labels, seed)
        scored = [n for n, (r, _) in found.items() if r.get("rdlv") is not None]
        worst = max(scored, key=lambda n: found[n][0]["rdlv"]) if scored else self.config.preset
        record, matched = found[worst]
        if len(found) > 1:
            record = {**record, "rdlv_by_attack": {n: r.get("rdlv") for n, (r, _) in found.items()}}
        assumes = self.assumptions(view)
        if assumes:
            record = {**record, "audit_assumes": assumes}
        return record, matched

    @staticmethod
    def _adapted(
        stock: str,
        name: str,
        attack: Attack,
        stock_found: tuple[dict[str, Any], torch.Tensor | None],
        view: ServerView,
    ) -> tuple[dict[str, Any], torch.Tensor | None] | None:
        """The adaptive counterpart's result when it would be the stock attack's (the known
        defences change nothing it uses): the stock result under its name; None: run it."""
        adapts = getattr(attack, "adapts", None)
        if adapts is None or adapts(view):
            return None
        record, matched = stock_found
        note = f"{name}: the known defences change nothing it uses; the same as {stock}"
        return {**record, "attack": name, "audit_note": note}, matched

    def assumptions(self, view: ServerView) -> str:
        """What the audit assumes of a server that does not see this update as it left the client
        (secure aggregation), in a sentence; empty when it sees it."""
        parts = []
        if self.secure_aggregation:
            parts.append(
                "the server sees only round sums: the update is attacked as if gradient "
                "disaggregation had recovered it exactly (an upper bound; the disaggregation: "
                "section measures whether it does)"
            )
        if any(
            isinstance(k, StatisticsWithheld) and k.mode == "secure-sum"
            for k in view.known_defenses
        ):
            parts.append(
                "the batch-norm statistics reach the server only inside round sums: attacked "
                "without them (disaggregating those sums over rounds, possible only where "
                "participation varies, is not attempted)"
            )
        return "; ".join(parts)

    def _attack(
        self,
        name: str,
        attack: Attack,
        view: ServerView,
        truth: torch.Tensor,
        labels: torch.Tensor,
        seed: int,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """One attack's record and its reconstructions paired with the originals (None: none)."""
        base = dict(audited=True, attack=name, defenses=self.defenses)
        reason = attack.applies(view)
        if reason is not None:
            return {**base, "rdlv": None, "audit_note": f"{name} does not apply: {reason}"}, None
        rec = attack.run(view, seed=seed, prior=self.prior, device=self.device)
        extra = (
            {}
            if rec.confidence is None or not math.isfinite(rec.confidence)
            else {"confidence": rec.confidence}
        )
        if not rec.feasible or rec.examples is None:
            # The attack found the batch beyond its reach and returned nothing: the server is left
            # with its prior, whose RDLV is 0 by definition (so a sweep sees the leak stopped).
            note = f"{name} infeasible: {rec.reason}"
            return {
                **base,
                "rdlv": 0.0,
                "audit_note": note,
                **extra,
                "attack_seconds": rec.seconds,
            }, None
        pairs = assign(rec.examples, truth, self.spec)  # one matching for every metric
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
        metrics = {k: v for k, v in s.summary().items() if k != "label_accuracy"}
        record = dict(
            audited=True,
            rdlv=leak.value,
            **metrics,
            label_accuracy=s.label_accuracy,
            label_strategy=rec.label_strategy,
            attack=name,
            **extra,
            defenses=self.defenses,
            attack_seconds=rec.seconds,
        )
        return record, rec.examples[torch.as_tensor(leak.best)]

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
