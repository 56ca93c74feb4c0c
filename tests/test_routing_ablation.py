"""experiments/routing_ablation.py: unknown variants are refused listing the valid ones, and a
one-run ablation on CPU reports the routing statistics it promises (real subprocess, real corpus)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import rule_study  # noqa: E402
from routing_ablation import DEFAULT_RULE, ROUTING_VARIANTS  # noqa: E402


def _main(*argv: str) -> int:
    return rule_study.main(list(argv), table=ROUTING_VARIANTS, prog="routing_ablation", baseline="frozen",
                           columns=rule_study.ROUTING_COLUMNS, rule=DEFAULT_RULE)


def test_unknown_variant_is_refused_listing_the_valid_ones(tmp_path):
    valid = ("graph, graph-learned-vq, graph-random-reseed, graph-1m-codes, graph-1m-codes-reseed12, "
             "graph-1m-codes-random-reseed, graph-reseed400, graph-1m-codes-reseed400, graph-10m-codes, frozen, topk, "
             "topk-float, hash")
    with pytest.raises(ValueError, match=r"unknown --variants \['switch'\]; valid: " + valid):
        _main("run", "--root", str(tmp_path), "--variants", "graph,switch", "--device", "cpu")
    assert not any(tmp_path.iterdir()), "nothing is launched when one name is wrong"


def test_an_unknown_rule_is_refused_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main("run", "--root", str(tmp_path), "--variants", "graph", "--rule", "float", "--device", "cpu")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --rule: invalid choice: 'float'" in err and "cool24-64" in err
    assert not any(tmp_path.iterdir())


def test_one_run_reports_mutual_information_load_and_live_codes(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    root = tmp_path / "ablation"
    code = _main("run", "--root", str(root), "--preset", "tiny", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "3", "--eval-windows", "4", "--log-every", "1",
                 "--variants", "frozen", "--seeds", "0", "--device", "cpu", "--data", str(corpus))
    assert code == 0, (root / "frozen-s0" / "train.log").read_text()[-2000:]
    config = json.loads((root / "frozen-s0" / "config.json").read_text())
    assert config["train"]["routing"] == "frozen" and config["model"]["routing"] == "frozen"
    rule = rule_study.VARIANTS[DEFAULT_RULE]  # the --rule default's flags reached the run
    assert config["train"]["threshold"] == int(rule[rule.index("--threshold") + 1])
    capsys.readouterr()
    assert _main("report", "--root", str(root), "--steps", "3", "--out", str(tmp_path / "out")) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| frozen")][0]
    mi, shares, live, window, bound = row.split(" | ")[7:12]
    assert window == bound == "-"  # 3 steps: no re-seed check has run, so no window count yet
    assert 0.0 <= float(mi) <= 2.0  # log2(4 experts) bounds it
    high, low = (float(v) for v in shares.split(" / "))  # "max / min"
    assert 0.0 <= high <= 1.0 and 0.0 <= low <= high
    assert live.endswith("%")
    assert (tmp_path / "out" / "ablation.md").read_text().startswith("| variant")


@pytest.mark.parametrize("codes,window,batch,seq_len,dead,cells", [
    # 64 codes, windows of 100 x 2 x 8 tokens: the bound is the codebook
    (64, None, 2, 8, 16, ["50.0%", "75.0%", "75.0%"]),
    # a million codes and windows of 100 x 4 x 1000 = 400,000 tokens: the bound is the tokens
    (1_000_000, None, 4, 1000, 800_000, ["50.0%", "20.0%", "50.0%"]),
    # the run's own vq_reseed_window: 10 x 4 x 1000 = 40,000 tokens
    (1_000_000, 10, 4, 1000, 980_000, ["50.0%", "2.0%", "50.0%"]),
])
def test_codes_hit_in_the_last_window_come_from_dead_codes_and_the_run_config(tmp_path, capsys, codes, window, batch,
                                                                              seq_len, dead, cells):
    run = tmp_path / "ablation" / "graph-s0"
    run.mkdir(parents=True)
    model = {"codebook_size": codes} if window is None else {"codebook_size": codes, "vq_reseed_window": window}
    (run / "config.json").write_text(json.dumps({"model": model, "train": {"batch_size": batch, "seq_len": seq_len}}))
    vq = {"perplexity": 9.0, "live_fraction": 0.5, "dead_codes": dead, "reseeded_total": 20}
    records = [{"step": 100, "tokens_per_s": 10.0, "routing": {"shared_vq": vq}},
               {"step": 100, "val_bits_per_byte": 2.0, "routing": {"shared_vq": vq}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _main("report", "--root", str(run.parent), "--steps", "100", "--baseline", "graph") == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| graph")][0]
    # live (usage > 0), then 1 - dead / codes, then hit / min(codes, vq_reseed_window x batch x seq_len)
    assert row.split(" | ")[9:12] == cells


def _write_curves(root, curves: dict[str, list[tuple[int, float]]]) -> None:
    for name, curve in curves.items():
        (root / name).mkdir(parents=True)
        records = [{"step": step, "val_bits_per_byte": val} for step, val in curve]
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# frozen stopped at step 200 (1.5 bits/byte); graph finished at 400 (1.2) but was 1.8 at 200:
# its final value beats frozen, yet at equal tokens it is 20% behind.
CUT_CURVES = {"frozen-s0": [(100, 2.0), (200, 1.5)], "graph-s0": [(100, 2.1), (200, 1.8), (400, 1.2)]}


def test_runs_cut_at_different_steps_are_compared_at_the_last_step_all_reached(tmp_path, capsys):
    root = tmp_path / "ablation"
    _write_curves(root, CUT_CURVES)
    assert _main("report", "--root", str(root), "--steps", "400", "--baseline", "frozen") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| val @ step 200 | vs frozen @ 200 |" in lines[0]
    graph = [line for line in lines if line.startswith("| graph")][0].split(" | ")
    frozen = [line for line in lines if line.startswith("| frozen")][0].split(" | ")
    assert graph[2:7] == ["1.2000", "1.2000", "-20.0%", "1.8000", "+20.0%"]
    assert frozen[1] == "1 (1 unfinished)" and frozen[5:7] == ["1.5000", "+0.0%"]


def test_runs_that_all_end_at_one_step_get_no_equal_step_columns(tmp_path, capsys):
    root = tmp_path / "ablation"
    _write_curves(root, {"frozen-s0": [(100, 1.5)], "graph-s0": [(100, 1.4)]})
    assert _main("report", "--root", str(root), "--steps", "100", "--baseline", "frozen") == 0
    assert "@ step" not in capsys.readouterr().out


def test_at_step_picks_the_comparison_step_and_refuses_one_not_every_run_reached(tmp_path, capsys):
    root = tmp_path / "ablation"
    _write_curves(root, CUT_CURVES)
    assert _main("report", "--root", str(root), "--steps", "400", "--baseline", "frozen", "--at-step", "100") == 0
    graph = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| graph")][0].split(" | ")
    assert graph[5:7] == ["2.1000", "+5.0%"]
    with pytest.raises(SystemExit, match=r"--at-step 400: .*\[100, 200\]"):
        _main("report", "--root", str(root), "--steps", "400", "--baseline", "frozen", "--at-step", "400")


def test_every_variant_names_a_valid_small_model():
    """A variant's --model overrides are ModelConfig fields of valid values (a typo fails here, not
    minutes into a GPU call), and each names the router it says."""
    from ternary_graph.cli import parse_model_overrides
    from ternary_graph.config import PRESETS

    for name, flags in ROUTING_VARIANTS.items():
        overrides = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--model"]
        cfg = PRESETS["small"].replace(**parse_model_overrides(overrides))  # __post_init__ checks the values
        assert name.startswith(flags[flags.index("--routing") + 1]), name
        if "1m-codes" in name:
            assert cfg.codebook_size == 1 << 20, name
        if "reseed400" in name:
            assert cfg.vq_reseed_window == 400, name
