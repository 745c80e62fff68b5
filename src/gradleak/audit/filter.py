"""The leakage audit as an update filter: it attacks the update exactly as the server would
receive it (after the defences before it in the list), compares with the client's images, records
the result row, and withholds the update when its RDLV passes the threshold."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradleak.attacks import GradientInversion, ServerView
from gradleak.audit.config import AuditConfig
from gradleak.audit.rdlv import rdlv
from gradleak.fl.filters import FilterContext
from gradleak.fl.update import ClientUpdate
from gradleak.metrics import assign, score
from gradleak.report.images import grid_png
from gradleak.rundir import SubDir
from gradleak.safeio import npz_bytes
from gradleak.seeding import derive_seed


class LeakageAudit:
    def __init__(
        self,
        config: AuditConfig,
        *,
        model: nn.Module,
        image_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        prior: torch.Tensor | None,
        out_dir: SubDir | None,
        defenses: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.settings = config.settings()
        self.attack = GradientInversion(self.settings)
        self.model = copy.deepcopy(model)
        self.image_shape, self.num_classes, self.mean, self.std = image_shape, num_classes, mean, std
        self.prior = prior
        self.out_dir = out_dir
        self.defenses = defenses
        self.device = device

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> ClientUpdate:
        cid = ctx.client.client_id
        if not self.config.applies(ctx.round, cid):
            return update
        truth, labels = ctx.client.data.images, ctx.client.data.labels
        if not all(torch.isfinite(v).all() for v in (*update.delta.values(), *ctx.global_state.values())):
            # Training diverged (e.g. under heavy noise): there is nothing finite to invert.
            ctx.record.update(audited=True, rdlv=None, attack=self.config.preset, defenses=self.defenses,
                              audit_note="update or global model not finite; not attacked")  # fmt: skip
            return update
        view = ServerView.of(
            self.model, ctx.global_state, update, image_shape=self.image_shape,
            num_classes=self.num_classes, mean=self.mean, std=self.std,
            known_labels=labels.clone() if self.settings.labels == "known" else None,
        )  # fmt: skip
        record = self.inspect(view, truth, labels, seed=derive_seed(ctx.seed, "audit", ctx.round, cid))
        ctx.record.update(record)
        if self.config.threshold is not None and record["rdlv"] > self.config.threshold:
            ctx.withheld = True
        return update

    def inspect(self, view: ServerView, truth: torch.Tensor, labels: torch.Tensor, *, seed: int) -> dict:
        """Attack one view, score it against the client's images, save the images (when enabled)
        and return the audit record (RDLV, SSIM, PSNR, MSE, label accuracy, attack time)."""
        rec = self.attack.run(view, seed=seed, prior=self.prior, device=self.device)
        pairs = assign(rec.images, truth)  # one matching for every metric: linear cost beyond it
        leak = rdlv(rec.images, rec.prior, truth, metric=self.config.metric, reduce=self.config.reduce,
                    assignment=pairs)  # fmt: skip
        s = score(rec.images, truth, rec.labels, labels, assignment=pairs)
        if self.config.save_images and self.out_dir is not None:
            self._save(view.meta.round, view.meta.client_id, truth, rec.prior, rec.images, leak.best)
        return dict(
            audited=True, rdlv=leak.value, ssim=float(s.ssim.mean()), psnr=float(s.psnr.mean()),
            mse=float(s.mse.mean()), label_accuracy=s.label_accuracy,
            label_strategy=rec.label_strategy, attack=self.config.preset,
            defenses=self.defenses, attack_seconds=rec.seconds,
        )  # fmt: skip

    def _save(self, round: int, cid: int, truth, prior, images, best: list[int]) -> None:
        """Originals, starts and reconstructions; only inside the run directory."""
        assert self.out_dir is not None
        stem = f"round_{round:04d}/client_{cid}"
        idx = torch.as_tensor(best)
        self.out_dir.write_bytes(f"{stem}.npz", npz_bytes(originals=truth.numpy(), priors=prior[idx].numpy(),
                                                          reconstructions=images[idx].numpy()))  # fmt: skip
        self.out_dir.write_bytes(f"{stem}.png", grid_png([("original", truth), ("start", prior[idx]),
                                                          ("reconstruction", images[idx])]))  # fmt: skip
