"""``ternary-graph viz``: pictures and graph files from a checkpoint or run folder.

    ternary-graph viz --checkpoint runs/tiny-ternary --what routing,stats,curves
    ternary-graph viz --checkpoint runs/tiny-ternary --what routing --format graphml --top 500
    ternary-graph viz --what curves --runs runs/tiny-ternary runs/tiny-float --out docs/img
    ternary-graph viz --what kg --entity json.decoder.JSONDecoder --hops 2 --out /tmp/kg

What is drawn (``--what``, comma-separated):

* ``routing``: the MoEGraph subgraph of ``--layer`` around the ``--top`` most used codes (or
  ``--codes``), as ``routing_layer<L>.<format>``; ``--format graphml|gexf`` writes the graph
  file instead of a picture.
* ``stats``: ``routing_stats.<png|svg>`` (expert load, edge scores, active edges over training
  from the run's ``metrics.jsonl``, code usage).
* ``curves``: ``loss.<png|svg>`` of ``--runs`` (run folders or metrics files), default the
  checkpoint's run.
* ``kg``: ``kg_<entity>.<png|svg>``, the ``--hops`` neighbourhood of ``--entity`` in the stdlib
  knowledge graph (or the one built from ``--kg-source``), ``--predicted`` TSV links dashed.

Expert load needs a routed batch: after loading, one validation batch of the run's data is
routed in eval mode (``--no-batch`` skips it; loads then fall back to edge in-degree).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WHAT = ("routing", "stats", "curves", "kg")
PICTURE_FORMATS = ("png", "svg")
GRAPH_FORMATS = ("graphml", "gexf")


def _what_list(text: str) -> list[str]:
    items = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in items if w not in WHAT]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--what takes a comma-separated subset of {','.join(WHAT)}, got {text!r}")
    return list(dict.fromkeys(items))


def _code_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--codes takes comma-separated code ids, got {text!r}") from err


def add_viz_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``viz`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("viz", help="routing graph, routing statistics, loss curves and KG pictures",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint .json/.safetensors or run folder (needed for routing and stats)")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/viz)")
    p.add_argument("--what", type=_what_list, default=["routing", "stats", "curves"],
                   help=f"comma-separated subset of {','.join(WHAT)} (default routing,stats,curves)")
    p.add_argument("--format", default="png", choices=PICTURE_FORMATS + GRAPH_FORMATS,
                   help="picture format; graphml/gexf export the routing graph (other pictures stay png)")
    p.add_argument("--layer", type=int, default=0, help="MoEGraph layer of the routing graph")
    p.add_argument("--top", type=int, default=40, help="most codes in the routing graph")
    p.add_argument("--codes", type=_code_list, default=None, help="comma-separated code ids to draw instead of --top")
    p.add_argument("--layout", default="bipartite", choices=("bipartite", "spring"))
    p.add_argument("--runs", nargs="+", default=None, help="run folders or metrics.jsonl files for the loss curves")
    p.add_argument("--labels", nargs="+", default=None, help="one label per --runs entry")
    p.add_argument("--entity", default=None, help="KG entity (qualified name) for --what kg")
    p.add_argument("--hops", type=int, default=1, help="KG neighbourhood radius")
    p.add_argument("--max-nodes", type=int, default=150, help="most KG entities drawn")
    p.add_argument("--kg-source", default=None, help="folder of .py sources for the KG (default: the stdlib)")
    p.add_argument("--kg-cache", default=None,
                   help="KG cache folder (default ~/.cache/ternary_graph/kg; 'none' disables)")
    p.add_argument("--predicted", default=None, help="TSV of head<TAB>relation<TAB>tail links to draw dashed")
    p.add_argument("--kg-scorer", default=None,
                   help="run folder or checkpoint of `ternary-graph train --task kg`: draw its top predicted "
                        "links of --entity dashed")
    p.add_argument("--predict-k", type=int, default=5, help="--kg-scorer: how many predicted links")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-batch", action="store_true", help="do not route a validation batch before plotting")
    p.set_defaults(func=run_viz)
    return p


def load_checkpoint_for_viz(path: str | os.PathLike[str], *, device: str = "cpu", route_batch: bool = True):
    """``(model, train_config, run_dir)`` of a checkpoint file or run folder.

    With ``route_batch`` one validation batch of the run's data is routed in eval mode (no
    state changes: eval forwards cast no votes and leave VQ usage alone) so that
    ``MoEGraph.last_routing`` holds real expert loads; if the run's data cannot be read the
    pictures fall back to edge in-degree and a warning says why.

    Raises FileNotFoundError for a path that does not exist and ValueError (the checkpoint
    module's ``CheckpointError``) for a folder without a complete checkpoint or a bad file.
    """
    from ..train.loop import load_model_from_checkpoint, prepare_data

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist (give a run folder or a ckpt_*.json)")
    model, cfg, _meta, _tensors = load_model_from_checkpoint(p, device=device)
    run_dir = p if p.is_dir() else p.parent
    if route_batch:
        try:
            _, val, _ = prepare_data(cfg)
        except (ValueError, OSError) as err:
            logger.warning("could not read the run's data (%s); expert load falls back to edge in-degree", err)
        else:
            x, _y = next(iter(val.validation_batches(cfg.batch_size, cfg.seq_len, cfg.batch_size)))
            model.eval()
            with torch.no_grad():
                model(x.to(device))
    return model, cfg, run_dir


def _read_predicted(path: str) -> list[tuple[str, str, str]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--predicted file {path!r} does not exist")
    out = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{p}:{number}: expected head<TAB>relation<TAB>tail, got {line!r}")
        out.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return out


def load_kg(source: str | None = None, cache: str | None = None):
    """The stdlib knowledge graph, or the one of the ``.py`` files under ``source``.

    A ``source`` folder that is a package (has ``__init__.py``) is named from its parent, so
    ``<stdlib>/json`` gives ``json.decoder...``. ``cache``: folder, ``'none'`` or None (default
    ``~/.cache/ternary_graph/kg``).
    """
    from ..kg.graph import build_kg_from_roots, build_stdlib_kg

    cache_dir = None if cache is not None and cache.lower() == "none" else \
        Path(cache) if cache is not None else Path.home() / ".cache" / "ternary_graph" / "kg"
    if source is None:
        return build_stdlib_kg(cache_dir=cache_dir)
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"--kg-source {source!r} is not a folder")
    package_root = root.parent if (root / "__init__.py").is_file() else root
    return build_kg_from_roots([root], package_root, cache_dir=cache_dir)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


def run_viz(args: argparse.Namespace) -> int:
    """Carry out ``ternary-graph viz``; prints each written path. Returns the exit status."""
    from .plots import (export_routing_graph, plot_kg_neighbourhood, plot_loss_curves, plot_routing_graph,
                        plot_routing_stats, top_predicted_links)

    what = args.what
    needs_model = {"routing", "stats"} & set(what)
    if needs_model and args.checkpoint is None:
        raise ValueError(f"--what {','.join(sorted(needs_model))} needs --checkpoint (a run folder or checkpoint file)")
    if "curves" in what and args.checkpoint is None and not args.runs:
        raise ValueError("--what curves needs --runs or --checkpoint")
    if "kg" in what and not args.entity:
        raise ValueError("--what kg needs --entity (a qualified name such as json.decoder.JSONDecoder)")
    if args.labels is not None and (args.runs is None or len(args.labels) != len(args.runs)):
        raise ValueError(f"--labels needs one label per --runs entry, got {args.labels!r} for {args.runs!r}")

    model = run_dir = None
    if args.checkpoint is not None and (needs_model or ("curves" in what and not args.runs)):
        if needs_model:
            model, _cfg, run_dir = load_checkpoint_for_viz(args.checkpoint, device=args.device,
                                                           route_batch=not args.no_batch)
        else:
            p = Path(args.checkpoint)
            if not p.exists():
                raise FileNotFoundError(f"checkpoint path {args.checkpoint!r} does not exist")
            run_dir = p if p.is_dir() else p.parent
    if args.out is not None:
        out = Path(args.out)
    elif run_dir is not None:
        out = run_dir / "viz"
    else:
        raise ValueError("--out is needed when no --checkpoint is given")
    picture = args.format if args.format in PICTURE_FORMATS else "png"

    written: list[Path] = []
    if "routing" in what:
        if args.format in GRAPH_FORMATS:
            written.append(export_routing_graph(model, out / f"routing_layer{args.layer}.{args.format}",
                                                layer=args.layer, top=args.top, codes=args.codes))
        else:
            written.append(plot_routing_graph(model, out / f"routing_layer{args.layer}.{picture}", layer=args.layer,
                                              codes=args.codes, top=args.top, layout=args.layout))
    if "stats" in what:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            logger.warning("no metrics.jsonl in %s: the training panel stays empty", run_dir)
            metrics = None
        written.append(plot_routing_stats(model, out / f"routing_stats.{picture}", metrics=metrics))
    if "curves" in what:
        runs = args.runs if args.runs else [run_dir]
        written.append(plot_loss_curves([Path(r) for r in runs], out / f"loss.{picture}", labels=args.labels))
    if "kg" in what:
        predicted = _read_predicted(args.predicted) if args.predicted else None
        kg = load_kg(args.kg_source, args.kg_cache)
        if args.kg_scorer:
            from ..kg.task import load_kg_scorer
            scorer, _, meta = load_kg_scorer(args.kg_scorer)
            if meta["graph"]["entities"] != kg.num_entities:
                raise ValueError(f"--kg-scorer {args.kg_scorer!r} was trained on a KG of {meta['graph']['entities']} "
                                 f"entities, this KG has {kg.num_entities}")
            predicted = (predicted or []) + top_predicted_links(kg, args.entity, scorer.score_fn(), k=args.predict_k)
        written.append(plot_kg_neighbourhood(kg, args.entity, out / f"kg_{_safe_name(args.entity)}.{picture}",
                                             hops=args.hops, max_nodes=args.max_nodes, predicted=predicted))
    for path in written:
        print(path)
    return 0
