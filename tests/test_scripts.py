"""The command-line entry points: flags, outputs, errors."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtjax import experiments, train

ROOT = Path(__file__).resolve().parents[1]


def _train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]


def test_train_script_both_activations(tmp_path, capsys):
    main = _train_main()
    out = tmp_path / "run"
    argv = ["--train-subset", "3000", "--epochs", "1", "--no-progress", "--out", str(out),
            "--device", "xi1=0.1"]  # fmt: skip
    report = main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved["gap_pp"] == pytest.approx(report["gap_pp"])
    for kind in ("tanh", "mtj"):
        assert saved["results"][kind]["test_accuracy"] > 0.6
        assert (out / kind / "metrics.jsonl").exists()
        assert (out / kind / "training_curves.png").stat().st_size > 1000
    assert saved["results"]["mtj"]["spec"]["mode"] == "table"
    assert abs(saved["gap_pp"]) < 1.0
    assert (out / "training_curves.png").exists()
    # the trained MTJ network comes back from its folder alone, with the reported accuracy
    loaded = train.load_run(out / "mtj")
    assert loaded.header["run_info"]["activation"] == "mtj" and loaded.header["step"] == 24
    assert loaded.header["run_info"]["device"] == [["xi1", 0.1]]
    assert float(loaded.model.activations[0].params.xi1) == pytest.approx(0.1)
    _, test = experiments.load_arrays("fashion_mnist", train_subset=1)
    eval_key = jax.random.fold_in(jax.random.key(0), 2**31 - 1)  # train's evaluation key
    _, acc = train.evaluate(loaded.model, *test, 1000, key=eval_key)
    assert acc == pytest.approx(saved["results"]["mtj"]["test_accuracy"], abs=1e-12)
    # resuming a finished run changes nothing
    again = main([*argv, "--resume"])
    assert again["gap_pp"] == pytest.approx(report["gap_pp"])
    # the run is not wiped by a new run, nor relabelled by a resume with other settings
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra, message in [
        ([], f"--out {out} already holds a run"),
        (["--resume", "--derivative", "mz"], "derivative: checkpoint 'mz2', now 'mz'"),
        (["--resume", "--read-noise", "0.1"], "read_noise: checkpoint 0.0, now 0.1"),
        (["--resume", "--device", "hk=100"], "device: checkpoint"),
        (["--resume", "--model", "784-64-10"], "sizes: checkpoint [784, 256, 10], now [784, 64"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with train.run_folder(out, resume=True):  # another run holds the folder
        with pytest.raises(SystemExit):
            main([*argv, "--resume"])
        assert f"run folder {out} is in use" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--model", "784-x-10"], "784-256-10"),
        (["--epochs", "0"], "must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--temperature", "300", "--mode", "table"], "needs a thermal mode"),
        (["--resume"], "--resume needs --out"),
        (["--variation", "-0.1"], "must be >= 0"),
        (["--model", "784-64-100"], "must start with 784 and end with 10"),
    ],
)
def test_train_script_bad_flags(argv, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr


def _parse_error(argv, capsys) -> str:
    parse_args = runpy.run_path(str(ROOT / "scripts" / "train.py"))["parse_args"]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
        (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
        (["--variation", "inf"], "--variation: must be >= 0 and finite, got inf"),
        (["--read-noise", "nan"], "--read-noise: must be >= 0 and finite, got nan"),
        (["--seed", "-1"], "--seed: must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], f"--seed: must be in [0, 2**32), got {2**32}"),
        (["--out", "x", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--device", "Ms=-1"], "--device: device: DeviceParams.Ms (A/m) must be > 0"),
        (["--device", "xi=0.3"], "device override 'xi=0.3': expected NAME=VALUE"),
        (["--device", "h_bias=4e3"], "h_bias takes 3 number(s)"),
    ],
)
def test_train_script_rejects_values(argv, message, capsys):
    assert message in _parse_error(argv, capsys)


def test_temperature_picks_the_thermal_mode(tmp_path):
    parse_args = runpy.run_path(str(ROOT / "scripts" / "train.py"))["parse_args"]
    out = str(tmp_path / "o")
    assert parse_args(["--temperature", "300", "--out", out]).mode == "thermal"
    assert parse_args(["--temperature", "300", "--mode", "sde", "--out", out]).mode == "sde"
    assert parse_args(["--out", out]).mode == "table"


def test_train_script_checks_out_up_front(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file"
    assert f"--out {out} exists and is not a folder" in _parse_error(["--out", str(out)], capsys)
    sub = out / "run"
    assert f"--out {sub}: {out} is not a folder" in _parse_error(["--out", str(sub)], capsys)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.json").write_text("{}")
    err = _parse_error(["--out", str(tmp_path / "used")], capsys)
    assert "already holds a run (results.json); pass --resume" in err
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        ro = tmp_path / "ro" / "run"
        assert "cannot write in" in _parse_error(["--out", str(ro)], capsys)


def test_device_demo_prints_table():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_demo.py"), "--points", "3"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 3
    for _u, _, mx, tanh, mz, sech in rows:
        assert abs(float(mx) - float(tanh)) < 1e-4
        assert abs(float(mz) - float(sech)) < 1e-3


def test_reproduce_summary_names_missing_parts(tmp_path):
    ns = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))
    assert ns["summarize"](tmp_path)["rows"] == []
    assert "kd: not run yet" in (tmp_path / "paper_reproduction.md").read_text()
    (tmp_path / "robustness.json").write_text('{"command": "x", "variation"')  # cut short
    with pytest.raises(ValueError, match="robustness.json: not a robustness result"):
        ns["summarize"](tmp_path)
    (tmp_path / "robustness.json").write_text('{"command": "x"}')  # fields missing
    with pytest.raises(ValueError, match="rerun --only robustness"):
        ns["summarize"](tmp_path)
    args = ns["parse_args"](["--transfer-seeds", "2", "--seeds", "4", "--only", "transfer"])
    assert ns["_command"](args, "transfer") == (
        "python scripts/reproduce.py --transfer-seeds 2 --only transfer"
    )  # fmt: skip


def test_reproduce_parses_its_only_choices(capsys):
    # --only robustness / --robustness-seeds were read by main but missing from the parser
    parse_args = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))["parse_args"]
    args = parse_args(["--only", "robustness", "--robustness-seeds", "2"])
    assert (args.only, args.robustness_seeds) == ("robustness", 2)
    assert parse_args([]).robustness_seeds == 3
    with pytest.raises(SystemExit):
        parse_args(["--robustness-seeds", "0"])
    assert "--robustness-seeds" in capsys.readouterr().err


def test_reproduce_quick_transfer_deploys_on_thermal_neurons(tmp_path):
    # finding (iii) alone (the full smoke run below is slow): the 300 K row deploys on thermal
    # neurons, with read noise off, as mean ± std over 5 noise keys with a non-zero spread
    main = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))["main"]
    report = main(["--quick", "--skip-cifar", "--no-progress", "--only", "transfer",
                   "--out", str(tmp_path)])  # fmt: skip
    rows = {r["experiment"]: r for r in report["rows"]}
    row = rows["(iii) FMNIST MLP: deploy, thermal, 300 K"]
    assert row["noise_keys"] == 5 and " ± " in row["mtj_pp"], row
    assert float(row["mtj_pp"].split(" ± ")[1]) > 0, row  # thermal noise is active
    assert rows["(iii) FMNIST MLP: deploy, table, ideal device"]["noise_keys"] == 1
    assert set(json.loads((tmp_path / "paper_reproduction.json").read_text())["sources"]) == {
        "transfer"
    }


@pytest.mark.slow
def test_reproduce_quick_smoke(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))["main"]
    report = main(["--quick", "--skip-cifar", "--no-progress", "--out", str(tmp_path)])
    table = (tmp_path / "paper_reproduction.md").read_text()
    for name in ("(i) MLP trained", "(ii) worst cell", "(iii) FMNIST MLP", "small CNN", "KD:"):
        assert name in table
    saved = json.loads((tmp_path / "paper_reproduction.json").read_text())
    assert saved["rows"] == report["rows"]
    rows = {r["experiment"]: r for r in saved["rows"]}
    # noisy rows are mean ± std over 5 noise keys, noise-free ones a single evaluation
    for label in ("thermal, 300 K", "table, 5 % variation + 0.01 read noise"):
        row = rows[f"(iii) FMNIST MLP: deploy, {label}"]
        assert row["noise_keys"] == 5 and " ± " in row["mtj_pp"], row
    assert rows["(iii) FMNIST MLP: deploy, table, ideal device"]["noise_keys"] == 1
    rob = json.loads((tmp_path / "robustness.json").read_text())
    assert len(rob["accuracy_pp"]["inference"]) == len(rob["variation"])
    assert rob["n_keys"] == 5
    std = np.asarray(rob["std_over_keys_pp"]["inference"])
    assert std[0, 0] == 0 and std[-1, -1] > 0  # no noise: one evaluation; noisy: a spread
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    assert rob["seeds"] == [0] and rob["reset_offset"]["offset"] == [0.1]
    assert len(rob["values_pp"]["training"][0][0]) == 1  # seeds x keys per cell
    assert "imperfect reset" in (tmp_path / "robustness.md").read_text()
    transfer = json.loads((tmp_path / "transfer.json").read_text())
    assert transfer["cifar100"] == "skipped (--skip-cifar)"
    assert transfer["command"] == "python scripts/reproduce.py --quick --skip-cifar --only transfer"
    # the summary is rebuilt from every part's JSON, each with the command that wrote it
    assert set(saved["sources"]) == {"curves", "robustness", "transfer", "kd"}
    assert saved["sources"]["kd"]["command"] == "python scripts/reproduce.py --quick --only kd"
    assert "`python scripts/reproduce.py --quick --only robustness`" in table
    # finding (i) on a non-ideal device: its own table, figure and JSON
    curves = json.loads((tmp_path / "device_curves.json").read_text())
    assert curves["devices"]["hk 8e3 A/m"]["deviation"]["max_abs_p1_minus_tanh"] > 0.15
    assert "| hk 8e3 A/m | 0.2" in (tmp_path / "device_curves.md").read_text()
    assert (tmp_path / "device_curves.png").stat().st_size > 1000
    assert "(i) MLP trained with MTJ neurons, hk 8e3 A/m, derivative mz2" in table
    kd = json.loads((tmp_path / "distillation.json").read_text())
    assert [c["width"] for c in kd["widths"]] == [16, 32] and len(kd["grid"]) == 2
    assert "KD gain" in (tmp_path / "distillation.md").read_text()
    assert (tmp_path / "distillation.png").stat().st_size > 1000


def test_device_size_quick(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "device_size.py"))["main"]
    out = main(["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = out["devices"]
    assert set(rows) == {"10", "50"}
    # the thermal table's spread at z = 0 is the small-noise formula's (moment approximation)
    for row in rows.values():
        assert abs(row["std_mx_z0_table"] / row["std_mx_z0_formula"] - 1) < 0.02
    assert rows["10"]["std_mx_z0_table"] > 4 * rows["50"]["std_mx_z0_table"]  # 1/sqrt(V)
    for name in ("device_size.json", "device_size.md", "device_size.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_codesign_scripts_record_the_command_that_reproduces_them():
    for script, argv, expected in (
        ("codesign.py", ["--keys", "3", "--out", "x", "--no-progress"], "--keys 3"),
        ("codesign_front.py", ["--quick", "--free", "diameter,thickness", "--levels", "3"],
         "--quick --free diameter,thickness --levels 3"),
    ):  # fmt: skip
        ns = runpy.run_path(str(ROOT / "scripts" / script))
        assert ns["_command"](ns["parse_args"](argv)) == f"python scripts/{script} {expected}"
        assert ns["_command"](ns["parse_args"]([])) == f"python scripts/{script}"
