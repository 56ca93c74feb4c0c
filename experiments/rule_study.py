"""Multi-seed study of the int8 update rule against the float twin (issue 13).

Launches ``ternary-graph train`` runs, several at once (a small model leaves most of an H200
idle), one folder per (variant, seed) under ``--root``, then reports every variant over its
seeds: final and best val bits/byte (mean ± sample std), the late regression (final against the
run's best), the seed spread, the gap to the baseline variant and the rule's health at the end
(averaged over the seeds).

    # launch (runs already finished under --root are kept, so a study can be extended)
    PYTHONPATH=. python3 experiments/rule_study.py run --root /tmp/study/tiny --preset tiny \\
        --steps 1221 --batch-size 64 --seq-len 256 --variants old,float --seeds 0,1,2 --parallel 6
    # report (also while runs are going: unfinished runs are marked)
    PYTHONPATH=. python3 experiments/rule_study.py report --root /tmp/study/tiny --out docs/measurements

Every variant spells out all of its rule flags, so a variant's meaning does not move when the
defaults of ``ternary-graph train`` change. Ternary runs on CUDA replay a captured step
(``--cuda-graph``) unless the variant lists ``--eager`` (a model with float parameters).
``experiments/routing_ablation.py`` runs this launcher and report over its own variants.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import subprocess
import sys
import tarfile
import time

# θ0, θ_final, ramp start (fraction of the run), E threshold, decay shift, vote magnitude
def _rule(theta: int, final: int | None, ramp_from: float = 0.0, scale: int = 64, decay: int | None = 4,
          votes: int = 4) -> list[str]:
    return ["--weights", "ternary", "--threshold", str(theta), "--threshold-final", str(final).lower(),
            "--threshold-ramp-from", str(ramp_from), "--scale-threshold", str(scale),
            "--decay-shift", str(decay).lower(), "--vote-magnitude", str(votes)]


VARIANTS: dict[str, list[str]] = {
    # the rule that was the default before this study
    "old": _rule(24, 48),
    # θ schedules: where the ramp ends (64 = the largest |acc| that ±4 votes with decay 4 reach:
    # a trit then needs an unbroken run of agreeing votes, the rule's "learning rate → 0")
    "ramp24-64": _rule(24, 64),
    "ramp16-64": _rule(16, 64),
    "ramp32-64": _rule(32, 64),
    "const32": _rule(32, None),
    "cool24-64": _rule(24, 64, ramp_from=0.5),
    "cool16-64": _rule(16, 64, ramp_from=0.5),
    # small-preset candidates (2026-12-01: small learned fastest once θ rose past 24): a higher
    # start, and decay 5, whose ceiling of 128 leaves room for θ above 64
    "cool40-64": _rule(40, 64, ramp_from=0.5),
    # cool40-64's early θ 40 with old's late θ 48: ahead of old until step ~1,500, then 9.7% behind at
    # 50M tokens (3 seeds, docs/results.md, 2026-12-07)
    "ramp40-48": _rule(40, 48),
    "d5-cool32-96": _rule(32, 96, ramp_from=0.5, decay=5),
    "d5-cool48-112": _rule(48, 112, ramp_from=0.5, decay=5),
    "d5-ramp32-96": _rule(32, 96, decay=5),
    # accumulator time scale: same ceiling 64, votes ±2 with decay 5 (slower EMA) or ±8 with decay 3
    "ema5": _rule(24, 48, votes=2, decay=5),
    "ema3": _rule(24, 48, votes=8, decay=3),
    # row-scale vote rate
    "scale32": _rule(24, 48, scale=32),
    "scale127": _rule(24, 48, scale=127),
    "scale0": _rule(24, 48, scale=0),
    # the float twin (AdamW, cosine): three learning rates, the same tuning budget a rule gets
    "float": ["--weights", "float", "--lr", "2e-3"],
    "float-lr1e-3": ["--weights", "float", "--lr", "1e-3"],
    "float-lr4e-3": ["--weights", "float", "--lr", "4e-3"],
}


def _run_dir(root: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
    return root / f"{variant}-s{seed}"


def _records(run: pathlib.Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _eval_records(run: pathlib.Path, records: list[dict] | None = None) -> list[dict]:
    return [r for r in (_records(run) if records is None else records) if "val_bits_per_byte" in r]


def _finished(run: pathlib.Path, steps: int) -> bool:
    evals = _eval_records(run)
    return bool(evals) and evals[-1]["step"] >= steps


EAGER = "--eager"  # in a variant's flags: no --cuda-graph for it (it is not a flag of ternary-graph train)


def _command(args: argparse.Namespace, variant: str, seed: int, cuda: bool) -> list[str]:
    rule = VARIANTS[args.rule] if getattr(args, "rule", None) else []  # a routing table's runs: the rule first
    extra = [a for a in rule + args.table[variant] if a != EAGER]
    ternary = "--weights" not in extra or extra[extra.index("--weights") + 1] == "ternary"
    capture = ternary and cuda and EAGER not in args.table[variant]
    cmd = [sys.executable, "-c", "import sys; from ternary_graph.cli import main; sys.exit(main())", "train",
           "--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--seed", str(seed), "--eval-every", str(args.eval_every),
           "--eval-windows", str(args.eval_windows), "--checkpoint-every", str(args.steps), "--keep-last", "1",
           "--log-every", str(args.log_every), "--no-progress", "--device", "cuda" if cuda else "cpu", "--out", str(_run_dir(args.root, variant, seed)),
           *extra]
    if capture:
        cmd.append("--cuda-graph")
    if args.data is not None:
        cmd += ["--data", args.data]
    return cmd


def launch(args: argparse.Namespace) -> int:
    import torch  # only to decide --cuda-graph; the runs are separate processes

    args.variants = list(dict.fromkeys(args.variants))  # "best,old" may name one variant twice
    unknown = [v for v in args.variants if v not in args.table]
    if unknown:
        raise ValueError(f"unknown --variants {unknown}; valid: {', '.join(args.table)}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.root.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in args.variants for s in args.seeds
            if not _finished(_run_dir(args.root, v, s), args.steps)]
    print(f"rule_study: {len(todo)} runs to go ({len(args.variants) * len(args.seeds) - len(todo)} already "
          f"finished), {args.parallel} at a time, {'CUDA' if cuda else 'CPU'}", flush=True)
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = 0
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            variant, seed = todo.pop(0)
            run = _run_dir(args.root, variant, seed)
            run.mkdir(parents=True, exist_ok=True)
            log = open(run / "train.log", "w")
            proc = subprocess.Popen(_command(args, variant, seed, cuda), stdout=log, stderr=subprocess.STDOUT)
            log.close()
            running.append((variant, seed, proc, time.perf_counter()))
        time.sleep(2.0)
        for item in list(running):
            variant, seed, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            evals = _eval_records(_run_dir(args.root, variant, seed))
            val = f"{evals[-1]['val_bits_per_byte']:.4f}" if evals else "-"
            failed += proc.returncode != 0
            print(f"[{time.perf_counter() - t0:6.0f} s] {variant}-s{seed}: exit {proc.returncode}, "
                  f"{time.perf_counter() - started:.0f} s, final val {val} bits/byte", flush=True)
    return 1 if failed else 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(root: pathlib.Path, steps: int | None) -> dict[str, dict]:
    """Per variant: the seeds found under ``root`` and their statistics."""
    runs: dict[str, list[pathlib.Path]] = {}
    for run in sorted(p for p in root.iterdir() if p.is_dir() and "-s" in p.name):
        variant = run.name.rsplit("-s", 1)[0]
        runs.setdefault(variant, []).append(run)
    out = {}
    for variant, folders in runs.items():
        finals, bests, regressions, tok_s, health, curves, done = [], [], [], [], [], [], []
        for run in folders:
            records = _records(run)
            evals = _eval_records(run, records)
            if not evals:
                continue
            vals = [r["val_bits_per_byte"] for r in evals]
            finals.append(vals[-1])
            bests.append(min(vals))
            regressions.append(vals[-1] / min(vals) - 1.0)
            speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
            tok_s.append(statistics.median(speeds) if speeds else float("nan"))
            health.append({**evals[-1].get("rule", {}), **_routing_health(evals[-1], records, _codebook(run))})
            curves.append([(r["step"], r["val_bits_per_byte"]) for r in evals])
            done.append(steps is None or evals[-1]["step"] >= steps)
        if not finals:
            continue
        mean, std = _mean_std(finals)
        out[variant] = {
            "seeds": len(finals), "finished": sum(done), "final_mean": mean, "final_std": std,
            "final_values": finals, "best_mean": statistics.fmean(bests),
            "late_regression_max": max(regressions), "spread": (max(finals) - min(finals)) / mean,
            "tokens_per_s": statistics.fmean(tok_s), "tokens_per_s_values": tok_s, "health": health, "curves": curves,
        }
    return out


def common_step(table: dict[str, dict]) -> int | None:
    """The last evaluation step that every run in ``table`` reached, or None when all runs end at
    the same step (their final values are then already at equal tokens)."""
    last = [curve[-1][0] for row in table.values() for curve in row["curves"]]
    if len(set(last)) == 1:
        return None
    shared = set.intersection(*({step for step, _ in curve} for row in table.values() for curve in row["curves"]))
    if not shared:
        raise SystemExit(f"the runs share no evaluation step (their last steps: {sorted(set(last))})")
    return max(shared)


def at_step(row: dict, step: int) -> tuple[float, float]:
    """Mean and std over a variant's seeds of the val bits/byte evaluated at ``step``."""
    curves = [dict(curve) for curve in row["curves"]]
    if any(step not in curve for curve in curves):
        raise SystemExit(f"--at-step {step}: not every run has an evaluation there "
                         f"(their evaluation steps: {sorted(set.intersection(*map(set, curves)))})")
    return _mean_std([curve[step] for curve in curves])


def _codebook(run: pathlib.Path) -> tuple[int | None, int | None]:
    """(codes of the shared VQ, tokens its re-seed window sees) from a run's config.json: a window
    is vq_reseed_window calls of batch_size x seq_len tokens each (every quantising layer calls once)."""
    path = run / "config.json"
    if not path.exists():
        return None, None
    from ternary_graph.config import saved_model_config

    cfg = json.loads(path.read_text())
    if "model" not in cfg:
        return None, None
    model, train = saved_model_config(cfg["model"]), cfg.get("train", {})
    window = model.vq_reseed_window * train["batch_size"] * train["seq_len"] if "batch_size" in train else None
    return model.codebook_size, window


def _routing_health(last_eval: dict, records: list[dict], codebook: tuple[int | None, int | None]) -> dict:
    """Means over the MoE layers of the last evaluation's routing (code -> expert mutual
    information, largest / smallest expert share), the shared VQ's last live fraction (usage > 0)
    and, once a re-seed check has run, the codes hit in the last window (1 - dead / codes), also
    as a fraction of the most a window can hit, min(codes, tokens in the window)."""
    layers = list(last_eval.get("val_routing", {}).values())
    out = {}
    if layers:
        for key in ("code_expert_mi_bits", "load_max_share", "load_min_share"):
            out[key] = statistics.fmean(layer[key] for layer in layers)
    vq = [r["routing"]["shared_vq"] for r in records if "shared_vq" in r.get("routing", {})]
    if vq:
        out["vq_live_fraction"] = vq[-1]["live_fraction"]
        codebook_size, window_tokens = codebook
        if codebook_size and vq[-1]["reseeded_total"] + vq[-1]["dead_codes"] > 0:  # else no check yet
            hit = codebook_size - vq[-1]["dead_codes"]
            out["vq_window_hit_fraction"] = hit / codebook_size
            if window_tokens:
                out["vq_window_bound_fraction"] = hit / min(codebook_size, window_tokens)
    return out


def _mean_health(health: list[dict]) -> dict:
    """Each health statistic averaged over the seeds that report it."""
    keys = {k for record in health for k in record}
    return {k: statistics.fmean(r[k] for r in health if k in r) for k in keys}


# Extra report columns: (header, key in a run's health record, format)
RULE_COLUMNS = (("zero trits", "zero_fraction", "{:.3f}"), ("saturated acc", "saturated_fraction", "{:.2e}"))
ROUTING_COLUMNS = (("code→expert MI (bits)", "code_expert_mi_bits", "{:.3f}"),
                   ("max / min expert share", ("load_max_share", "load_min_share"), "{:.3f} / {:.3f}"),
                   ("shared-VQ live codes", "vq_live_fraction", "{:.1%}"),
                   ("codes hit in the last window", "vq_window_hit_fraction", "{:.1%}"),
                   ("of min(codes, window tokens)", "vq_window_bound_fraction", "{:.1%}"))


def _health_cell(health: dict, key, fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    return fmt.format(*(health[k] for k in keys)) if all(k in health for k in keys) else "-"


def report(args: argparse.Namespace) -> int:
    table = summarise(args.root, args.steps)
    if not table:
        raise SystemExit(f"{args.prog}: no runs with a validation record under {args.root}")
    base = table.get(args.baseline)
    columns = args.columns
    # Runs that stopped at different steps are also compared where all of them have an evaluation:
    # the final values of a half-trained run and a finished one are not at equal tokens.
    step = args.at_step if args.at_step is not None else common_step(table)
    at = {v: at_step(row, step) for v, row in table.items()} if step is not None else {}
    step_header = f" val @ step {step} | vs {args.baseline} @ {step} |" if step is not None else ""
    lines = ["| variant | seeds | final val bits/byte | best | vs " + args.baseline + " |" + step_header
             + " late regression (max) | seed spread | " + " | ".join(c[0] for c in columns) + " | tokens/s |",
             "|---|---|---|---|---|" + "---|---|" * (step is not None) + "---|---|" + "---|" * len(columns) + "---|"]
    for variant, row in sorted(table.items(), key=lambda kv: kv[1]["final_mean"]):
        gap = f"{row['final_mean'] / base['final_mean'] - 1:+.1%}" if base else "-"
        step_cells = ""
        if step is not None:
            mean, step_std = at[variant]
            step_gap = f"{mean / at[args.baseline][0] - 1:+.1%}" if base else "-"
            step_cells = f" {mean:.4f}" + ("" if math.isnan(step_std) else f" ± {step_std:.4f}") + f" | {step_gap} |"
        health = _mean_health(row["health"])
        cells = " | ".join(_health_cell(health, key, fmt) for _, key, fmt in columns)
        std = "" if math.isnan(row["final_std"]) else f" ± {row['final_std']:.4f}"
        unfinished = "" if row["finished"] == row["seeds"] else f" ({row['seeds'] - row['finished']} unfinished)"
        lines.append(f"| {variant} | {row['seeds']}{unfinished} | {row['final_mean']:.4f}{std} | {row['best_mean']:.4f} "
                     f"| {gap} |{step_cells} {row['late_regression_max']:+.2%} | {row['spread']:.2%} | {cells} "
                     f"| {row['tokens_per_s']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.name or args.root.name
        (args.out / f"{stem}.md").write_text(text + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(table, indent=1))
        _plot(table, args.out / f"{stem}.png", args.root.name)
        with tarfile.open(args.out / f"{stem}_runs.tar.gz", "w:gz") as tar:
            for path in sorted(args.root.glob("*/*")):
                if path.name in ("metrics.jsonl", "config.json", "train.log"):
                    tar.add(path, arcname=str(path.relative_to(args.root)))
    return 0


def best(args: argparse.Namespace) -> int:
    """Print the name of the variant with the lowest mean final val among ``--kind`` variants."""
    table = summarise(args.root, args.steps)
    kind = [v for v in table if (v.startswith("float") == (args.kind == "float")) and table[v]["finished"]]
    if not kind:
        raise SystemExit(f"{args.prog}: no finished {args.kind} runs under {args.root}")
    print(min(kind, key=lambda v: table[v]["final_mean"]))
    return 0


def _plot(table: dict[str, dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, row in sorted(table.items()):
        steps = [s for s, _ in row["curves"][0]]
        n = min(len(c) for c in row["curves"])
        mean = [statistics.fmean(c[i][1] for c in row["curves"]) for i in range(n)]
        ax.plot(steps[:n], mean, label=f"{variant} (n={row['seeds']})",
                linestyle="--" if variant.startswith("float") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("val bits/byte (mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    low = min(min(v for _, v in c) for row in table.values() for c in row["curves"])
    ax.set_ylim(low * 0.98, low * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None, *, table: dict[str, list[str]] = VARIANTS, doc: str = __doc__,
         prog: str = "rule_study", baseline: str = "float", columns=RULE_COLUMNS, rule: str | None = None) -> int:
    """``rule``: for a table of variants that leave the update rule open (the routing ablation), the
    default of ``run --rule``, which names the rule_study variant whose flags every run gets."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="launch the runs that are not finished yet")
    r.add_argument("--preset", default="tiny")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--eval-windows", type=int, default=1024)
    r.add_argument("--log-every", type=int, default=50)
    r.add_argument("--variants", type=lambda s: s.split(","), default=list(table)[:2])
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--device", default="auto", help="cpu forces CPU runs (no --cuda-graph)")
    r.add_argument("--data", default=None, help="text file or folder (default: this Python's stdlib sources)")
    if rule is not None:
        rules = [name for name, flags in VARIANTS.items() if flags[flags.index("--weights") + 1] == "ternary"]
        r.add_argument("--rule", default=rule, choices=rules,
                       help="the update rule of every run (a rule_study variant; give each rule its own --root)")
    q = sub.add_parser("report", help="tabulate the runs found under --root")
    q.add_argument("--baseline", default=baseline)
    q.add_argument("--out", type=pathlib.Path, default=None, help="write <name>.md/.json/.png and a tarball of the logs")
    q.add_argument("--name", default=None, help="file stem under --out (default: the root folder's name)")
    q.add_argument("--at-step", type=int, default=None,
                   help="also compare every variant at this evaluation step (default: the last step all runs "
                        "reached, when they stopped at different steps)")
    b = sub.add_parser("best", help="print the best finished variant of one kind")
    b.add_argument("--kind", choices=("ternary", "float"), default="ternary")
    for sp in (r, q, b):
        sp.add_argument("--root", type=pathlib.Path, required=True)
        sp.add_argument("--steps", type=int, default=1221 if sp is r else None,
                        help="the runs' length (report: marks runs that stopped short)")
    args = p.parse_args(argv)
    args.table, args.prog, args.columns = table, prog, columns
    if args.command == "run":
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
        return launch(args)
    return report(args) if args.command == "report" else best(args)


def run_cli(**kwargs) -> int:
    """``main`` for a shell: a ValueError (an unknown variant, say) is one line on stderr, exit 2."""
    try:
        return main(**kwargs)
    except ValueError as exc:
        print(f"{kwargs.get('prog', 'rule_study')}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
