"""Ternary vs float on the stdlib corpus, same architecture, same data, same token budget.

    PYTHONPATH=. .venv/bin/python experiments/train_tiny.py [--steps 1500] [--out runs] [--reuse]

Trains ``tiny`` twice through ``ternary_graph.train.loop.train`` (``--weights ternary`` and
``--weights float``: every TernaryLinear / embedding table becomes nn.Linear / nn.Embedding
trained with AdamW), evaluates both on the same validation windows, and writes
``<out>/compare_tiny.md`` (table) and ``<out>/compare_tiny.png`` (curves). With ``--reuse``,
existing run folders ``<out>/tiny-ternary`` and ``<out>/tiny-float`` (e.g. from
``bash run.sh train`` and ``bash run.sh train --weights float``) are summarised instead of retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

from ternary_graph.train.loop import TrainConfig, evaluate, load_model_from_checkpoint, prepare_data, train
from ternary_graph.train.data import unigram_bits_per_byte
from ternary_graph.viz.plots import plot_loss_curves, read_metrics


def summarise(run_dir: pathlib.Path) -> dict:
    model, cfg, meta, _ = load_model_from_checkpoint(run_dir)
    cfg.eval_windows = 0  # every validation window
    train_ds, val_ds, _ = prepare_data(cfg)
    nats = evaluate(model, val_ds, cfg)
    records = read_metrics(run_dir / "metrics.jsonl")
    tok_s = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"run": str(run_dir), "weights": cfg.weights, "steps": meta["data_position"]["next_step"],
            "tokens": meta["data_position"]["next_step"] * cfg.batch_size * cfg.seq_len,
            "val_bits_per_byte": nats / math.log(2), "val_windows": val_ds.num_validation_windows(cfg.seq_len),
            "unigram_bits_per_byte": unigram_bits_per_byte(train_ds, val_ds),
            "median_tokens_per_s": sorted(tok_s)[len(tok_s) // 2] if tok_s else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--reuse", action="store_true", help="summarise existing runs instead of training")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    runs = {w: out / f"tiny-{w}" for w in ("ternary", "float")}
    if not args.reuse:
        for weights, run_dir in runs.items():
            train(TrainConfig(preset="tiny", weights=weights, steps=args.steps, out=str(run_dir), threads=args.threads))
    rows = {w: summarise(d) for w, d in runs.items()}
    tern, flt = rows["ternary"], rows["float"]
    gap = tern["val_bits_per_byte"] / flt["val_bits_per_byte"] - 1.0
    table = [
        f"Validation on all {tern['val_windows']:,} windows of {TrainConfig().seq_len} bytes of the held-out stdlib files "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        "| model | steps | tokens | val bits/byte | tokens/s (2-core CPU, median) |",
        "|---|---|---|---|---|",
        f"| unigram bytes (training frequencies) | – | – | {tern['unigram_bits_per_byte']:.3f} | – |",
    ]
    for name, r in (("tiny, float weights + AdamW", flt), ("tiny, ternary int8 votes", tern)):
        table.append(f"| {name} | {r['steps']:,} | {r['tokens']:,} | {r['val_bits_per_byte']:.3f} | "
                     f"{r['median_tokens_per_s']:,.0f} |")
    table += ["", f"Ternary is {gap:+.1%} relative to float in validation bits/byte (target: within +15%)."]
    (out / "compare_tiny.md").write_text("\n".join(table) + "\n")
    (out / "compare_tiny.json").write_text(json.dumps(rows, indent=2))
    plot_loss_curves([runs["ternary"], runs["float"]], out / "compare_tiny.png", labels=["ternary", "float"])
    print("\n".join(table))


if __name__ == "__main__":
    main()
