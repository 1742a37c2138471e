"""The command-line entry points: flags, outputs, errors."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]


def test_train_script_both_activations(tmp_path):
    main = _train_main()
    out = tmp_path / "run"
    argv = ["--train-subset", "3000", "--epochs", "1", "--no-progress", "--out", str(out)]
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
    # resuming a finished run changes nothing
    again = main([*argv, "--resume"])
    assert again["gap_pp"] == pytest.approx(report["gap_pp"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--model", "784-x-10"], "784-256-10"),
        (["--epochs", "0"], "must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--temperature", "300", "--mode", "table"], "use --mode sde"),
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


def test_reproduce_quick_smoke(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))["main"]
    report = main(["--quick", "--skip-cifar", "--no-progress", "--out", str(tmp_path)])
    table = (tmp_path / "paper_reproduction.md").read_text()
    for name in ("(i) MLP trained", "(ii) worst cell", "(iii) FMNIST MLP", "small CNN", "KD:"):
        assert name in table
    saved = json.loads((tmp_path / "paper_reproduction.json").read_text())
    assert saved["rows"] == report["rows"]
    rob = json.loads((tmp_path / "robustness.json").read_text())
    assert len(rob["accuracy_pp"]["inference"]) == len(rob["variation"])
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    assert saved["cifar100"] == "skipped (--skip-cifar)"
