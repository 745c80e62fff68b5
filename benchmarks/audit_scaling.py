"""How the audit's cost grows with the audited client's batch: the attack, the scoring (matching,
SSIM/PSNR/MSE, RDLV) and peak memory; JSON output.

    .venv/bin/python benchmarks/audit_scaling.py CASE [CASE ...]     (or: all)

Cases:
  scaling   one client's update (one SGD step of an MLP, hidden 64, on N 32 x 32 colour photo tiles,
            N = 16, 64, 256, 1,024), attacked by inverting-gradients for 2 iterations (the attack's
            own cost is not the question here) and scored as the audit scores it; each N in a fresh
            process, so that its peak resident memory is its own.
Results go to benchmarks/results/audit_scaling_CASE.json and stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys

from cases import run_cases

BATCHES = (16, 64, 256, 1024)

# Run in a child process: one batch size, printed as JSON.
CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from gradleak.images import ImageSpec
from gradleak.attacks import GradientInversion, ServerView, preset
from gradleak.audit import rdlv
from gradleak.data import bundled
from gradleak.fl.update import UpdateMeta
from gradleak.metrics import assign, score
from gradleak.models import build_model

torch.set_num_threads(1)
n = int(sys.argv[1])
images, labels, _ = bundled.load_tiles(list(bundled.PHOTOS), 32, 16, 200, 0)
g = torch.Generator().manual_seed(0)
pick = torch.randperm(len(images), generator=g)[:n]
x, y = images[pick], labels[pick]
torch.manual_seed(0)
model = build_model("mlp", spec=ImageSpec.square(3, 32), num_classes=8, kwargs={"hidden": [64]})
mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
xn = (x - 0.5) / 0.25
grads = torch.autograd.grad(F.cross_entropy(model(xn), y), list(model.parameters()))
update = {k: -0.1 * gr for (k, _), gr in zip(model.named_parameters(), grads)}
meta = UpdateMeta(client_id=1, round=1, num_samples=n, lr=0.1, epochs=1, steps=1, batch_size=n)
view = ServerView(model=model, global_state={k: v.detach().clone() for k, v in
model.state_dict().items()},
                  update=update, meta=meta, spec=ImageSpec((3, 32, 32), mean, std), num_classes=8)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
rec = GradientInversion(preset("inverting-gradients", iterations=2)).run(view, seed=0)
attack = time.perf_counter() - t
rss_attack = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
pairs = assign(rec.examples, x)
leak = rdlv(rec.examples, rec.start, x, metric="ssim", assignment=pairs)
s = score(rec.examples, x, rec.labels, y, assignment=pairs)
scoring = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"batch": n, "attack_seconds": attack, "scoring_seconds": scoring,
                  "peak_rss_mib": rss / 1024, "rss_before_attack_mib": rss0 / 1024,
                  "rss_after_attack_mib": rss_attack / 1024, "rdlv": leak.value, "ssim":
                  float(s.ssim.mean())}))
"""


def _scaling() -> dict:
    rows = []
    for n in BATCHES:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    return {"batches": rows}


if __name__ == "__main__":
    run_cases({"scaling": _scaling}, "audit_scaling", __doc__)
