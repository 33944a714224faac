"""sweep.py: the grid, skipping and resuming runs, evaluation, the summary, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
import sweep
import train
from errors import BadInput

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))  # the runs' subprocesses inherit it


def train_flags(tiny_checkpoint, chat_dataset, *extra):
    return ["--model", str(tiny_checkpoint), "--dataset", str(chat_dataset), "--max-new-tokens", "6",
            "--batch-size", "2", "--max-length", "96", "--learning-rate", "1e-3", "--quant-type", "int4",
            "--group-size", "32", "--eval-steps", "1", "--eval-dataset", str(chat_dataset), *extra]


def results_in(directory: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json")) if p.name != "summary.json"}


def checkpoint_times(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.glob("*/checkpoint-*/model.safetensors")}


def test_a_2x2_grid_trains_every_run_once_and_summarizes(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    root = tmp_path / "sweep"
    argv = ["--grid", "lmbda=0,1", "beta=0,1", "--root", str(root), "--launcher", sys.executable, "--",
            *train_flags(tiny_checkpoint, chat_dataset, "--max-steps", "1")]
    assert sweep.main(argv) == 0
    results = results_in(root / "results")
    assert list(results) == ["lmbda0_beta0_seed42", "lmbda0_beta1_seed42", "lmbda1_beta0_seed42",
                             "lmbda1_beta1_seed42"]
    for name, result in results.items():
        assert result["config"]["lmbda"] == float(result["values"]["lmbda"])
        assert result["config"]["beta"] == float(result["values"]["beta"])
        assert [p["step"] for p in result["curve"]] == [0, 1]
        start, end = (p["heldout_kl"] for p in result["curve"])
        assert result["final"]["heldout_kl_gap_closed"] == pytest.approx(1 - end / start)
        assert result["final"]["step"] == 1 and result["final"]["train_min"] > 0
        assert (result["final"]["tokens_generated"] > 0) == (result["values"]["lmbda"] == "1")
        assert result["commands"]["train"].endswith(f"--output_dir {root / name}")
    summary = (root / "results" / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| lmbda | beta | seeds | steps | held-out KL | KL gap closed |")
    assert len([line for line in summary if line.startswith("| 0 |") or line.startswith("| 1 |")]) == 4
    for plot in ("curves_step.png", "curves_time.png", "final_vs_lmbda.png", "final_vs_beta.png"):
        assert (root / "results" / plot).stat().st_size > 0

    # The same command again: every run is complete, nothing retrains.
    before = checkpoint_times(root)
    assert len(before) == 4
    assert sweep.main(argv) == 0
    assert checkpoint_times(root) == before


def test_interrupted_runs_resume_and_the_committed_results_summarize_alone(tmp_path, tiny_checkpoint, chat_dataset,
                                                                           capsys):
    root = tmp_path / "sweep"
    # --stop-after 1 of 2 steps: each invocation of the sweep does one step of each run (a time box)
    argv = ["--grid", "lmbda=0.5", "--root", str(root), "--launcher", sys.executable,
            "--eval", "--tasks '' --no-perplexity --embedded --limit 4", "--",
            *train_flags(tiny_checkpoint, chat_dataset, "--max-steps", "2", "--stop-after", "1")]
    assert sweep.main(argv) == 0
    assert [p.name for p in root.glob("*/checkpoint-*")] == ["checkpoint-1"]
    capsys.readouterr()
    assert sweep.main([*argv[:argv.index("--")], "--dry-run", *argv[argv.index("--"):]]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and " --resume " in printed[0] and " && python " in printed[0]

    assert sweep.main(argv) == 0
    results = results_in(root / "results")
    assert list(results) == ["lmbda0.5_seed42"]
    for name, result in results.items():
        assert [p["step"] for p in result["curve"]] == [0, 1, 2] and result["final"]["step"] == 2
        assert checkpoints.latest_checkpoint(root / name).name == "checkpoint-2"
        # evaluated again after the resumption: the row is the final checkpoint's
        assert list(json.loads((root / name / "eval" / "results.json").read_text())["rows"]) == [
            "teacher", "ptq", f"{name}/checkpoint-2"]
        assert set(result["eval"]["rows"]) == {"teacher", "ptq", "student"}
        assert result["final"]["teacher_nll_of_student"] == result["eval"]["rows"]["student"]["teacher_nll_of_student"]
        # the exposure-bias curve travels with the result, per prompt for paired comparisons
        assert len(result["eval"]["rows"]["student"]["exposure"]["kl"]["1-32"]["per_prompt"]) == 4
    runs = sweep.plan_runs(sweep.parse_grid(["lmbda=0.5"]), 1, train_flags(tiny_checkpoint, chat_dataset,
                                                                        "--max-steps", "2"), root)
    assert [r["action"] for r in runs] == ["done"]
    # the same grid again without --eval: the result keeps the evaluation and the command that made it
    evaluated = results_in(root / "results")
    without_eval = argv[:argv.index("--eval")] + argv[argv.index("--eval") + 2:]
    assert sweep.main(without_eval) == 0
    assert results_in(root / "results") == evaluated

    committed = tmp_path / "committed"
    shutil.copytree(root / "results", committed)
    summary = (committed / "summary.md").read_text()
    (committed / "summary.md").unlink()
    shutil.rmtree(root)
    assert sweep.main(["--summarize", str(committed)]) == 0
    assert (committed / "summary.md").read_text() == summary
    # On another machine the committed result stands for the finished run: nothing to redo...
    flags = train_flags(tiny_checkpoint, chat_dataset, "--max-steps", "2")
    runs = sweep.plan_runs(sweep.parse_grid(["lmbda=0.5"]), 1, flags, root, committed)
    assert [r["action"] for r in runs] == ["recorded"]
    # ...unless the run asked for is another one
    assert [r["action"] for r in sweep.plan_runs(sweep.parse_grid(["lmbda=0.5"]), 1, flags[:-1] + ["3"], root,
                                                 committed)] == ["train"]
    with pytest.raises(BadInput, match="records a run with a different configuration \\(beta\\)"):
        sweep.plan_runs(sweep.parse_grid(["lmbda=0.5"]), 1, [*flags, "--beta", "0.9"], root, committed)


def test_summary_gives_mean_and_spread_over_seeds_per_setting():
    def result(lmbda, seed, kl):
        return {"name": f"lmbda{lmbda}_seed{seed}", "values": {"lmbda": lmbda, "seed": seed}, "curve": [],
                "final": {"step": 5, "heldout_kl": kl, "heldout_kl_gap_closed": 1 - kl / 0.5}}

    text, table = sweep.summarize([result("0", 42, 0.2), result("0", 43, 0.3), result("1", 42, 0.25)])
    rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert rows[0].startswith("| 0 | 2 | 5 | 0.2500 ± 0.0707 | 50.0% ± 14.1% |")
    assert rows[1].startswith("| 1 | 1 | 5 | 0.2500 | 50.0% |")
    assert table[0]["heldout_kl"] == {"mean": pytest.approx(0.25), "spread": pytest.approx(0.0707, abs=1e-4),
                                      "n": 2}


def exposure(kl_by_bucket, nll_by_bucket):
    def curve(means):
        return {bucket: {"mean": m, "ci_low": m, "ci_high": m, "tokens": 10, "prompts": 2, "sample_sd": None,
                         "per_prompt": [m, m]} for bucket, m in means.items()}

    return {"max_new_tokens": 64, "samples_per_prompt": 2, "temperature": 1.0, "prompts": 2, "tokens": 40,
            "kl": curve(kl_by_bucket), "teacher_nll": curve(nll_by_bucket)}


def arm_result(values, seed, kl, late_kl):
    """A run of ``values`` with its held-out KL and an exposure-bias curve (late_kl: 33-64)."""
    name = "_".join(f"{k}{v}" for k, v in values.items()) + f"_seed{seed}"
    rows = {"teacher": {"exposure": exposure({"1-32": 0.0, "33-64": 0.0}, {"1-32": 0.5, "33-64": 0.4})},
            "ptq": {"exposure": exposure({"1-32": 0.6, "33-64": 0.9}, {"1-32": 1.5, "33-64": 1.9})},
            "student": {"exposure": exposure({"1-32": kl, "33-64": late_kl}, {"1-32": 1.0, "33-64": 1.0 + late_kl})}}
    return {"name": name, "values": {**values, "seed": seed}, "curve": [],
            "final": {"step": 5, "heldout_kl": kl, "heldout_kl_gap_closed": 1 - kl / 0.5, "train_min": 3.0 + seed % 2},
            "eval": {"tasks": [], "limit": None, "rows": rows}}


ARMS = ([arm_result({"lmbda": "0"}, s, kl, late) for s, kl, late in ((42, 0.20, 0.40), (43, 0.21, 0.42), (44, 0.19, 0.41))]
        + [arm_result({"lmbda": "1"}, s, kl, late) for s, kl, late in ((42, 0.25, 0.30), (43, 0.26, 0.31), (44, 0.25, 0.29))]
        + [arm_result({"seq_kd": "true", "lmbda": "0"}, s, 0.22, 0.35) for s in (42, 43)])


def test_the_summary_gives_each_settings_exposure_curve_under_ptq_and_teacher():
    text, table = sweep.summarize(ARMS)
    assert "| ptq | KL(T‖S) | 0.6000 | 0.9000 |" in text
    assert "| teacher | teacher NLL | 0.5000 | 0.4000 |" in text
    assert "| lmbda=1 | KL(T‖S) | 0.2533 ± 0.0058 | 0.3000 ± 0.0100 |" in text
    assert "| lmbda=0 seq_kd=true | KL(T‖S) | 0.2200 ± 0.0000 | 0.3500 ± 0.0000 |" in text
    assert table[0]["exposure"]["kl"]["33-64"] == {"mean": pytest.approx(0.41), "spread": pytest.approx(0.01), "n": 3}


def test_compare_tests_one_setting_against_another_over_seeds(tmp_path, capsys):
    for result in ARMS:
        (tmp_path / f"{result['name']}.json").write_text(json.dumps(result))
    (tmp_path / "calibration.json").write_text(json.dumps({"lmbda0": {"median_step_s": 16.3}}))  # not a run
    assert sweep.main(["--summarize", str(tmp_path), "--compare", "lmbda=0", "lmbda=1"]) == 0
    out = capsys.readouterr().out
    assert "lmbda=1 vs lmbda=0, over seeds (3 and 3 runs" in out
    # worse on held-out KL, better late in its own samples, level on the minutes
    assert "- heldout_kl: lmbda=0 better than lmbda=1 by 0.0533" in out
    assert "- exposure KL(T‖S) 33-64: lmbda=1 better than lmbda=0 by 0.1100" in out
    assert "- train_min: no significant difference" in out
    assert (tmp_path / "exposure.png").exists()
    # the seq-kd arm is its own setting, not lmbda=0's
    assert sweep.main(["--summarize", str(tmp_path), "--compare", "lmbda=0", "seq_kd=true,lmbda=0"]) == 0
    assert "(3 and 2 runs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--compare", "lmbda=0", "lmbda=1"], "give it with --summarize RESULTS"),
    (["--compare", "lmbda", "lmbda=1", "--summarize", "RESULTS"], "'lmbda' is not a setting"),
    (["--compare", "lmbda=0", "lmbda=0.5", "--summarize", "RESULTS"],
     "no runs of lmbda=0.5; the settings here are lmbda=0; lmbda=1; lmbda=0,seq_kd=true"),
])
def test_a_bad_comparison_is_one_line(tmp_path, capsys, argv, message):
    for result in ARMS:
        (tmp_path / f"{result['name']}.json").write_text(json.dumps(result))
    assert sweep.main([a.replace("RESULTS", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert captured.out == "" and not (tmp_path / "summary.md").exists()


def test_final_metrics_take_the_curve_and_close_each_gap_against_teacher_and_ptq():
    curve = [{"step": 0, "train_s": 0.0, "tokens_generated": 0, "heldout_kl": 0.5, "heldout_kl_gap_closed": 0.0},
             {"step": 10, "train_s": 120.0, "tokens_generated": 640, "heldout_kl": 0.1, "heldout_kl_gap_closed": 0.8}]
    rows = {"teacher": {"arc_easy": {"acc": 0.5, "acc_stderr": 0.03}, "mmlu": {"acc": 0.3, "acc_stderr": 0.04},
                        "ppl": 30.0, "heldout_kl": 0.0, "teacher_nll_of_student": 0.6},
            "ptq": {"arc_easy": {"acc": 0.4, "acc_stderr": 0.03}, "mmlu": {"acc": 0.2, "acc_stderr": 0.04},
                    "ppl": 50.0, "heldout_kl": 0.5, "teacher_nll_of_student": 1.0},
            "student": {"arc_easy": {"acc": 0.45, "acc_stderr": 0.03}, "mmlu": {"acc": 0.3, "acc_stderr": 0.04},
                        "ppl": 40.0, "heldout_kl": 0.1, "teacher_nll_of_student": 0.7}}
    final = sweep.final_metrics(curve, {"tasks": ["arc_easy", "mmlu"], "limit": 10, "rows": rows})
    assert final["step"] == 10 and final["train_min"] == 2.0 and final["tokens_generated"] == 640
    assert (final["heldout_kl"], final["heldout_kl_gap_closed"]) == (0.1, 0.8)
    assert final["bench_avg"] == pytest.approx(0.375) and final["bench_gap_closed"] == pytest.approx(0.75)
    assert final["bench_avg_stderr"] == pytest.approx((0.03 ** 2 + 0.04 ** 2) ** 0.5 / 2)
    assert final["ppl_gap_closed"] == pytest.approx(0.5) and final["teacher_nll_gap_closed"] == pytest.approx(0.75)


def test_dry_run_prints_one_command_per_run_with_the_launcher(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--grid", "lr=1e-5,1e-4", "quant_type=mxfp4", "--seeds", "2", "--root", str(root),
                       "--dry-run", "--launcher", "accelerate launch --num_processes 8", "--",
                       *train_flags(tiny_checkpoint, chat_dataset)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["lr1e-05_mxfp4_seed42", "lr1e-05_mxfp4_seed43", "lr0.0001_mxfp4_seed42", "lr0.0001_mxfp4_seed43"]
    assert len(lines) == 4
    for line, name in zip(lines, names):
        assert line.startswith("accelerate launch --num_processes 8 ") and " train.py " in line
        assert line.endswith(f"--seed {name[-2:]} --output_dir {root / name}")
    assert not root.exists()


def test_a_run_in_bf16_is_launched_in_bf16(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--grid", "mixed_precision=no,bf16", "--root", str(root), "--dry-run", "--",
                       *train_flags(tiny_checkpoint, chat_dataset)]) == 0
    plain, bf16 = capsys.readouterr().out.splitlines()
    assert plain.startswith("accelerate launch train.py ")  # as before: the launcher's default
    assert bf16.startswith("accelerate launch --mixed_precision bf16 train.py ") and "--mixed-precision bf16" in bf16
    assert sweep.main(["--grid", "mixed_precision=bf16", "--root", str(root), "--dry-run",
                       "--launcher", "accelerate launch --mixed_precision=bf16", "--",
                       *train_flags(tiny_checkpoint, chat_dataset)]) == 0
    assert capsys.readouterr().out.startswith("accelerate launch --mixed_precision=bf16 train.py ")


def test_an_on_off_flag_sweeps_as_the_flag_and_its_no_form(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--grid", "fused_loss=true,false", "--root", str(root), "--dry-run", "--",
                       *train_flags(tiny_checkpoint, chat_dataset)]) == 0
    on, off = capsys.readouterr().out.splitlines()
    assert " --fused-loss " in on and " --no-fused-loss " in off


def test_eval_flags_with_an_unclosed_quote_are_one_line(tmp_path, capsys):
    assert sweep.main(["--grid", "lmbda=0", "--root", str(tmp_path / "sweep"), "--eval", "--tasks 'x", "--"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eval flags" in err and "No closing quotation" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("grid, extra, message", [
    (["nosuch=1,2"], [], "--grid key 'nosuch' is not a train.py flag"),
    (["lmbda="], [], "--grid key 'lmbda' has no values"),
    (["lmbda=0,2"], [], "run lmbda2_seed42: --lmbda must be in [0, 1]"),
    (["output_dir=a,b"], [], "is set by the sweep for each run"),
    (["lmbda=0"], ["--output-dir", "x"], "--output-dir after -- is set by the sweep"),
    (["lmbda=0"], ["--no-such-flag", "1"], "train.py flags after --: unrecognized arguments: --no-such-flag"),
    (["fused_loss=maybe"], [], "--grid fused_loss is on or off: give true or false, got 'maybe'"),
])
def test_bad_input_is_one_line_and_launches_nothing(tmp_path, capsys, grid, extra, message):
    root = tmp_path / "sweep"
    assert sweep.main(["--grid", *grid, "--root", str(root), "--", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not root.exists()


def test_a_run_directory_with_another_configuration_is_refused(tmp_path, capsys):
    root = tmp_path / "sweep"
    existing = root / "lmbda0_seed42"
    existing.mkdir(parents=True)
    other = train.parse_config(["--lmbda", "0", "--beta", "0.9", "--output_dir", str(existing)])
    (existing / "run_config.json").write_text(json.dumps(train.run_config_dict(other)))
    assert sweep.main(["--grid", "lmbda=0", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{existing} holds a run with a different configuration (beta)" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == ["lmbda0_seed42"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGHUP"])
def test_ctrl_c_reaches_the_run_and_the_sweep_waits_for_it_to_save(tmp_path, signal_name):
    # A stand-in launcher: it signals the sweep (its parent), as Ctrl-C or a closed terminal
    # would, then waits for the signal to be passed on to it and "saves" (writes a file, with
    # the time torch's launcher would give its workers) before exiting 130, as train.py does.
    # subprocess.run would kill it 0.25 s after the interrupt, unsaved.
    launcher = tmp_path / "launcher.py"
    launcher.write_text(f"""import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.{signal_name}}})
os.kill(os.getppid(), signal.{signal_name})
signal.sigwait({{signal.{signal_name}}})
open({str(tmp_path / "saved")!r}, "w").write(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
sys.exit(130)
""")
    result = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "--grid", "lmbda=0", "--root", str(tmp_path / "s"),
                             "--launcher", f"{sys.executable} {launcher}", "--", "--max-steps", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (tmp_path / "saved").read_text() == str(sweep.LAUNCHER_SHUTDOWN_S)
    assert result.returncode == 130
    assert "error: run lmbda0_seed42 exited with 130; rerun the same sweep command to resume it" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_grid_value_with_a_slash_names_a_flat_run_directory(tmp_path, chat_dataset):
    other = tmp_path / "other" / chat_dataset.name
    other.parent.mkdir()
    other.write_text(chat_dataset.read_text())
    runs = sweep.plan_runs({"dataset": [str(chat_dataset), str(other)]}, 1, ["--max-steps", "1"], tmp_path / "root")
    assert [r["output_dir"].parent for r in runs] == [tmp_path / "root"] * 2
    assert len({r["name"] for r in runs}) == 2 and not any("/" in r["name"] for r in runs)
    with pytest.raises(BadInput, match="would both be named"):
        sweep.plan_runs({"dataset": ["a/b", "a_b"]}, 1, ["--max-steps", "1"], tmp_path / "root")


def test_changed_eval_flags_re_evaluate_a_finished_run(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    root = tmp_path / "sweep"
    common = ["--grid", "lmbda=0", "--root", str(root), "--launcher", sys.executable]
    flags = ["--", *train_flags(tiny_checkpoint, chat_dataset, "--max-steps", "1")]
    assert sweep.main([*common, "--eval", "--tasks '' --no-perplexity --embedded --limit 2", *flags]) == 0
    assert sweep.main([*common, "--eval", "--tasks '' --no-perplexity --embedded --limit 3", *flags]) == 0
    result = results_in(root / "results")["lmbda0_seed42"]
    assert result["eval"]["limit"] == 3 and result["commands"]["eval"].endswith("--limit 3")
