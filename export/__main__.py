"""`python -m export`: write ONNX and ExecuTorch artifacts (inference and training) plus DIR/manifest.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.artifacts import ModelSpec, export_encoder_artifacts, export_model_artifacts, summary
from export.parity import DEFAULT_TRAINING_STEPS, ParityError
from models.loss import LossSettings
from models.zoo import ARCHITECTURES


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be C,H,W, got {text!r}")
    return parts  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--arch", action="append", default=[], help=f"zoo model ({', '.join(ARCHITECTURES)}, all)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--input-shape", type=_shape, required=True, help="C,H,W")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", action="store_true", help="also export the hash encoder")
    parser.add_argument("--encoder-kind", default="conv")
    parser.add_argument("--encoder-dim", type=int, default=256)
    parser.add_argument("--encoder-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="initial weights baked into the programs")
    parser.add_argument("--weights", type=Path, help="a device's trained state dict (.npz) to export instead")
    parser.add_argument("--batch", type=int, default=8, help="largest training batch (dynamic 1..batch)")
    parser.add_argument("--kd-alpha", type=float, default=LossSettings.kd_alpha)
    parser.add_argument("--temperature", type=float, default=LossSettings.temperature)
    parser.add_argument("--parity-steps", type=int, default=DEFAULT_TRAINING_STEPS)
    parser.add_argument("--no-training", action="store_true", help="skip the training program")
    parser.add_argument("--no-inference", action="store_true", help="skip the ONNX and ExecuTorch inference files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    archs = list(ARCHITECTURES) if "all" in args.arch else args.arch
    if not archs and not args.encoder:
        _parser().error("give --arch and/or --encoder")
    if args.weights and len(archs) != 1:
        _parser().error("--weights needs exactly one --arch")
    weights = None
    if args.weights:
        from export.weights import load_weights

        weights = load_weights(args.weights)
    loss = LossSettings(kd_alpha=args.kd_alpha, temperature=args.temperature)
    records = []
    try:
        for arch in archs:
            spec = ModelSpec(arch=arch, classes=args.classes, input_shape=args.input_shape)
            records += export_model_artifacts(
                spec,
                args.out,
                seed=args.seed,
                weights=weights,
                loss=loss,
                max_batch=args.batch,
                parity_steps=args.parity_steps,
                training=not args.no_training,
                inference=not args.no_inference,
            )
        if args.encoder:
            records += export_encoder_artifacts(
                args.out,
                input_shape=args.input_shape,
                kind=args.encoder_kind,
                dim=args.encoder_dim,
                seed=args.encoder_seed,
            )
    except ParityError as error:
        print(f"parity check failed: {error}", file=sys.stderr)
        return 1
    print(summary(records))
    print(f"manifest: {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
