"""How many shared-VQ codes a trained model really uses, and why (issue 14).

Runs a checkpoint over validation windows in eval mode (no re-seeding, no usage updates) and
reports, for each quantising block and for all of them together, the codes its inputs reach
against the codebook's size and the tokens seen, with the two quantities that decide the
nearest-code search: the input norm against the code norms, and the effective rank of the inputs;
and how many codes are distinct (a duplicate code is never nearest).

    PYTHONPATH=. python3 experiments/vq_utilisation.py --checkpoint runs/tiny-ternary [--windows 512]
"""

from __future__ import annotations

import argparse
import sys

import torch

from ternary_graph.train.loop import load_model_from_checkpoint, prepare_data


def distinct_codes(packed: torch.Tensor, E: torch.Tensor) -> int:
    """Codes that differ in trits or scale: identical codes tie in the nearest-code search, which
    gives every input to the smallest id, so each duplicate beyond the first can never be reached.

    Shapes: packed (codes, bytes) uint8, E (codes,) int8."""
    if packed.dim() != 2 or E.shape != packed.shape[:1]:
        raise ValueError(f"packed must be (codes, bytes) and E (codes,), got {tuple(packed.shape)} and {tuple(E.shape)}")
    rows = torch.cat([packed.to(torch.int16), E.to(torch.int16).reshape(-1, 1)], dim=1)
    return torch.unique(rows, dim=0).shape[0]


@torch.no_grad()
def vq_utilisation(checkpoint: str, windows: int, device: str = "cpu") -> dict:
    """One entry per quantising block (its inputs, the codes they reach) and the union of their codes."""
    model, cfg, _, _ = load_model_from_checkpoint(checkpoint, device=device)
    model.eval()
    _, val, _ = prepare_data(cfg)
    vq = model.shared_vq
    layers = [b.layer for b in model.blocks if b.vq_proj is not None]  # the VQ's callers, in call order
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, ids) of every call the blocks make
    hook = vq.register_forward_hook(lambda m, args, out: calls.append(
        (args[0].float().reshape(-1, vq.dim), out.ids.reshape(-1))))
    for x, y in val.validation_batches(cfg.batch_size, cfg.seq_len, windows):
        model(x.to(cfg.device), y.to(cfg.device))
    hook.remove()
    code_norm = vq.codes.weight.dequantize().norm(dim=1)
    report: dict = {"codes": vq.num_codes, "distinct_codes": distinct_codes(vq.codes.weight.packed, vq.codes.weight.E),
                    "input_norm_setting": vq.input_norm,
                    "code_norm_p1_p50_p99": [float(v) for v in code_norm.quantile(torch.tensor([0.01, 0.5, 0.99]))]}
    every_id = []
    for i, layer in enumerate(layers):
        z = torch.cat([z for z, _ in calls[i::len(layers)]])
        ids = torch.cat([ids for _, ids in calls[i::len(layers)]])
        every_id.append(ids)
        spectrum = torch.linalg.svdvals(z - z.mean(dim=0)) ** 2
        p = spectrum / spectrum.sum()
        used = torch.unique(ids).numel()
        report[f"layer{layer}"] = {
            "tokens": z.shape[0], "codes_used": used, "used_of_bound": used / min(z.shape[0], vq.num_codes),
            "input_norm_mean": float(z.norm(dim=1).mean()),
            "norm_of_the_used_codes": float(code_norm[ids].mean()),
            "input_effective_rank": float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())),
        }
    tokens = sum(report[f"layer{layer}"]["tokens"] for layer in layers)
    used = torch.unique(torch.cat(every_id)).numel()
    report["all_layers"] = {"tokens": tokens, "codes_used": used, "used_of_bound": used / min(tokens, vq.num_codes)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--windows", type=int, default=512, help="validation windows (default %(default)s)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error(f"--windows must be >= 1, got {args.windows}")
    for key, value in vq_utilisation(args.checkpoint, args.windows, args.device).items():
        print(f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
