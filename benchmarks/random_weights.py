"""Save an open_clip architecture with random weights to a local file, as a teacher for
throughput benchmarks: what a forward pass costs does not depend on the weights, and nothing is
downloaded.

    python benchmarks/random_weights.py benchmarks/configs/teacher-vit-b-64px.json \\
        --out runs/bench/vit-b-64px/teacher.pt

The architecture is a built-in config, an open_clip name or a model config ``.json``; the file
is a plain state dict that ``--teacher-checkpoint`` (and open_clip_train's
``--distill-pretrained``) load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The shim before open_clip, which imports torchvision.
import trainers.torchvision_compat

trainers.torchvision_compat.ensure_torchvision_importable()

import open_clip  # noqa: E402

from trainers.models import resolve_model_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="built-in config, open_clip name or model config .json")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random init")
    args = parser.parse_args()
    name = resolve_model_name(args.model)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(name, pretrained=None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {params:.1f}M parameters, random weights (seed {args.seed}) -> {out}")


if __name__ == "__main__":
    main()
