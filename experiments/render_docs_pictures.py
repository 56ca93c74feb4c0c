"""Render the pictures of ``docs/img`` from a real training run.

    PYTHONPATH=. .venv/bin/python experiments/render_docs_pictures.py \\
        --run runs/tiny-ternary --float-run runs/tiny-float --out docs/img

Writes ``routing.png`` (MoEGraph layer 0 around the 40 most used codes), ``routing_stats.png``
(expert load, edge scores, active edges over training, code usage), ``loss.png`` (train and
validation bits per byte; ternary vs float when ``--float-run`` is given) and ``kg_json.png``
(the neighbourhood of ``--entity`` in the knowledge graph of this Python's standard library).

The checkpoint is the latest complete one of ``--run``; one validation batch of the run's own
data is routed first so that expert sizes show real loads. Prints each path written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ternary_graph.viz.cli import load_checkpoint_for_viz, load_kg
from ternary_graph.viz.plots import plot_kg_neighbourhood, plot_loss_curves, plot_routing_graph, plot_routing_stats


def _run_label(run_dir: Path) -> str:
    """``"<preset> <weights>"`` from the run's config.json, else the folder name."""
    config = run_dir / "config.json"
    if not config.is_file():
        return run_dir.name
    train = json.loads(config.read_text(encoding="utf-8")).get("train", {})
    return f"{train.get('preset', '?')} {train.get('weights', '?')}"


def render(run: Path, out: Path, *, float_run: Path | None = None, entity: str = "json.decoder.JSONDecoder",
           hops: int = 2, layer: int = 0, top: int = 40, kg_cache: str | None = None) -> list[Path]:
    """Write the four docs pictures into ``out``; returns their paths."""
    model, cfg, run_dir = load_checkpoint_for_viz(run)
    written = [
        plot_routing_graph(model, out / "routing.png", layer=layer, top=top),
        plot_routing_stats(model, out / "routing_stats.png", metrics=run_dir / "metrics.jsonl"),
    ]
    runs, labels = [run_dir], [f"{cfg.preset} {cfg.weights}"]
    if float_run is not None:
        float_dir = float_run if float_run.is_dir() else float_run.parent
        runs.append(float_dir)
        labels.append(_run_label(float_dir))
    written.append(plot_loss_curves(runs, out / "loss.png", labels=labels))
    kg = load_kg(None, kg_cache)
    written.append(plot_kg_neighbourhood(kg, entity, out / "kg_json.png", hops=hops))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/tiny-ternary"), help="run folder or checkpoint")
    parser.add_argument("--float-run", type=Path, default=None, help="float baseline run folder (loss curves)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--entity", default="json.decoder.JSONDecoder", help="KG entity of kg_json.png")
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--kg-cache", default=None, help="KG cache folder ('none' disables)")
    args = parser.parse_args(argv)
    try:
        paths = render(args.run, args.out, float_run=args.float_run, entity=args.entity, hops=args.hops,
                       layer=args.layer, top=args.top, kg_cache=args.kg_cache)
    except (ValueError, FileNotFoundError) as err:
        print(f"render_docs_pictures: error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
