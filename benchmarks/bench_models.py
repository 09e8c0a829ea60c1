"""Training cost per step of every model in a config at its demo sizes: forward, task loss + auxiliary losses,
backward and one Adam step on one batch of random inputs of the demo's shapes (EHR hours x 76 features, 17
observation masks, the frozen X-ray encoder's pooled 512-d features, 25 labels), one CPU thread by default. Methods
that take over the step (AUG's two manual steps, InfoReg's gradient scaling, SMIL's inner-loop meta-update) cost more
inside the trainer.

    PYTHONPATH=src python benchmarks/bench_models.py [--config config/config.yaml] [--hidden 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from ehrcxr.models import Batch, create_model

REPO = Path(__file__).resolve().parents[1]
FEATURES, VARIABLES, LABELS, HOURS = 76, 17, 25, 48


def demo_batch(size: int, paired_share: float, generator: torch.Generator) -> Batch:
    """Random stays of the demo's shapes: 12-48 valid hours, ~30% of the variables observed per hour, pooled X-ray
    features for ``paired_share`` of the stays."""
    lengths = torch.randint(12, HOURS + 1, (size,), generator=generator)
    has_cxr = (torch.rand(size, generator=generator) < paired_share).float()
    return Batch(ehr=torch.randn(size, HOURS, FEATURES, generator=generator),
                 ehr_mask=(torch.rand(size, HOURS, VARIABLES, generator=generator) < 0.3).float(),
                 ehr_length=lengths, cxr=torch.randn(size, 512, 1, 1, generator=generator) * has_cxr[:, None, None, None],
                 has_cxr=has_cxr, cxr_hours=torch.rand(size, generator=generator) * 24 * has_cxr,
                 labels=(torch.rand(size, LABELS, generator=generator) < 0.2).float(), stay_id=torch.arange(size))


def step_seconds(name: str, entry: dict, config: dict, batch: Batch, hidden: int | None, repeats: int
                 ) -> tuple[float, int]:
    """Seconds per training step of one config entry and its trainable parameter count."""
    torch.manual_seed(0)
    params = dict(entry["params"], **({"hidden": hidden} if hidden else {}))
    cxr = {key: config["cxr"][key] for key in ("depth", "weights")} | {"frozen_stages": 4, "pretrained": None}
    model = create_model(entry.get("architecture", name), n_labels=LABELS, ehr_features=FEATURES, cxr=cxr, **params)
    if hasattr(model, "set_generated"):  # DDL-CXR reads its generator's latents: random ones of the demo's shape
        autoencoder = config["ddl_cxr"]["autoencoder"]
        side = autoencoder["image_size"] // 2 ** (len(autoencoder["block_out_channels"]) - 1)
        model.set_generated(batch.stay_id, torch.randn(len(batch.stay_id), autoencoder["latent_channels"], side, side))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=1e-3)
    model.train()

    def step():
        output = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels)
        loss = loss + sum(output.aux_losses.values(), torch.zeros(()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats, sum(p.numel() for p in trainable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--hidden", type=int, help="override every model's width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--paired-share", type=float, default=0.26, help="share of stays with an X-ray (demo: 26%%)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    batch = demo_batch(int(config["train"]["batch_size"]), args.paired_share, torch.Generator().manual_seed(0))
    rows = {name: step_seconds(name, entry, config, batch, args.hidden, args.repeats)
            for name, entry in config["models"].items()}
    reference = rows.get("late_fusion", (None,))[0]
    print(f"batch {len(batch.stay_id)}, {HOURS} h, {args.threads} thread(s), width "
          f"{args.hidden or 'as configured'}\n\n| model | trainable parameters | s/step | × late_fusion |\n|---|---|---|---|")
    for name, (seconds, count) in rows.items():
        ratio = f"{seconds / reference:.2f}" if reference else "—"
        print(f"| {name} | {count:,} | {seconds:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
