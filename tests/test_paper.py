"""Finding (i) on non-ideal devices: RunSpec.device, curve deviations, the paired study."""

import dataclasses
import json

import numpy as np
import pytest

from mtjax import experiments as ex
from mtjax import paper
from mtjax.nn import MTJActivation


def test_runspec_device_overrides_the_nominal_device_and_round_trips():
    spec = ex.RunSpec(activation="mtj", device=(("xi1", 0.3), ("h_bias", (0.0, 0.0, 4e3))))
    nominal = spec.nominal()
    assert float(nominal.xi1) == pytest.approx(0.3)
    assert np.allclose(nominal.h_bias, [0, 0, 4e3])
    act = ex.make_activation(spec, 4, None)
    assert isinstance(act, MTJActivation) and float(act.params.xi1) == pytest.approx(0.3)
    # as read back from a checkpoint header (JSON: tuples become lists)
    info = json.loads(json.dumps(spec.run_info()))
    model = ex.model_from_run_info(info)
    assert np.allclose(model.activations[0].params.h_bias, [0, 0, 4e3])


@pytest.mark.parametrize(
    "device,message",
    [
        ((("xi", 0.3),), "unknown DeviceParams field(s) ['xi']"),
        ((("Ms", -1.0),), "DeviceParams.Ms (A/m) must be > 0"),
        ((("hk", 1.0), ("hk", 2.0)), "repeated field"),
        ((("temperature", 300.0),), "use `temperature`"),
    ],
)
def test_runspec_device_rejects_bad_overrides(device, message):
    with pytest.raises(ValueError, match="device: ") as err:
        ex.RunSpec(activation="mtj", device=device)
    assert message in str(err.value)


def test_parse_device_override():
    assert ex.parse_device_override("xi1=0.3") == ("xi1", 0.3)
    assert ex.parse_device_override("h_bias=0,0,4e3") == ("h_bias", (0.0, 0.0, 4000.0))
    for bad, msg in (("xi=1", "NAME=VALUE"), ("hk", "NAME=VALUE"), ("hk=a", "numbers"),
                     ("h_bias=1", "takes 3"), ("hk=1,2,3", "takes 1")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            ex.parse_device_override(bad)


def test_curve_deviations_match_the_closed_form_for_field_like_torque():
    # zero effective field: m.p1 = tanh(u) exactly, m.p2 = sech(u) cos(psi) with
    # psi / u = (xi - alpha) / (1 + alpha xi); the circuit's input_scale makes u = z
    xi, alpha = 0.3, 0.01
    dev = paper.curve_deviations(ex.RunSpec(activation="mtj", device=(("xi1", xi),)))
    z = np.linspace(-3, 3, 601)
    k = (xi - alpha) / (1 + alpha * xi)
    expected = np.max(np.abs(np.cos(k * z) - 1) / np.cosh(z))
    assert dev["max_abs_p1_minus_tanh"] < 1e-5
    assert dev["max_abs_p2_minus_sech"] == pytest.approx(expected, rel=1e-3)
    ideal = paper.curve_deviations(ex.RunSpec(activation="mtj"))
    assert ideal["max_abs_p2_minus_sech"] < 2e-3  # cos(alpha u): <= 1 - cos(0.03)
    # residual perpendicular anisotropy holds m near +z: |m.p1| < tanh, growing with hk
    weak, strong = (
        paper.curve_deviations(ex.RunSpec(activation="mtj", device=(("hk", h),)))
        for h in (2e3, 8e3)
    )
    assert 0.005 < weak["max_abs_p1_minus_tanh"] < 0.03 < 0.15 < strong["max_abs_p1_minus_tanh"]
    z61, p1 = np.asarray(strong["z"]), np.asarray(strong["p1"])
    assert np.all(np.abs(p1[z61 != 0]) < np.tanh(np.abs(z61[z61 != 0])))


def test_device_curve_study_pairs_by_seed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
    data = ((x[:192], y[:192]), (x[192:], y[192:]))
    base = ex.RunSpec(sizes=(16, 8, 4), epochs=1, batch_size=64, lr=1e-2)
    devices = {"hk 8e3": (("hk", 8e3),)}
    result, software = paper.device_curve_study(
        base, data, [0, 1], devices, derivatives=("autodiff", "mz2")
    )
    assert set(software) == {0, 1}
    e = result["devices"]["hk 8e3"]
    tanh, auto, mz2 = (
        np.asarray(v)
        for v in (result["tanh_accuracy"], e["accuracy"]["autodiff"], e["accuracy"]["mz2"])
    )
    assert e["curve_cost_pp"]["mean"] == pytest.approx(100 * np.mean(tanh - auto))
    assert e["curve_cost_pp"]["std"] == pytest.approx(100 * np.std(tanh - auto, ddof=1))
    assert e["derivative_cost_pp"]["mz2"]["mean"] == pytest.approx(100 * np.mean(auto - mz2))
    assert e["deviation"]["max_abs_p1_minus_tanh"] > 0.15
    # the study's software networks are the tanh runs of each seed
    spec0 = dataclasses.replace(base, activation="tanh", seed=0)
    acc0 = ex.run(spec0, *data, progress=False)[0]["test_accuracy"]
    assert acc0 == tanh[0]
    md = paper.curve_study_markdown(result)
    assert "| hk 8e3 | 0.2" in md and "derivative cost (autodiff - mz2)" in md
    assert "over 2 seed(s)" in md
    assert paper.curve_study_figure(result, tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="autodiff"):
        paper.device_curve_study(base, data, [0], devices, derivatives=("mz2",))
    with pytest.raises(ValueError, match="at least one"):  # was a StopIteration in markdown
        paper.device_curve_study(base, data, [0], {})


def test_distill_sweep_pairs_each_kd_run_with_the_student_alone(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1280, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] * x[:, 2] > 0.3)
    data = ((x[:1024], y[:1024]), (x[1024:], y[1024:]))
    teacher = ex.RunSpec(sizes=(8, 16, 3), epochs=2, batch_size=64, lr=1e-2)
    student = ex.RunSpec(sizes=(8, 4, 3), activation="mtj", epochs=1, batch_size=64, lr=2e-2)
    out = paper.distill_sweep(teacher, student, data, seeds=(0, 1), temperatures=(1.0, 4.0),
                              alphas=(0.5,), widths=(4, 6), epochs=(1, 2))  # fmt: skip
    cells = [c for row in out["grid"] for c in row]
    assert [c["temperature"] for c in cells] == [1.0, 4.0]
    best = max(cells, key=lambda c: c["gain_pp"]["mean"])
    assert out["best"] == {"temperature": best["temperature"], "alpha": 0.5}
    for c in cells + out["widths"] + out["epochs"]:
        gains = 100 * (np.asarray(c["kd"]) - np.asarray(c["alone"]))
        assert c["gain_pp"]["mean"] == pytest.approx(gains.mean())
        assert len(c["kd"]) == 2
    # the reference student (width 4, 1 epoch) is one run, reused across the lines
    assert out["widths"][0]["alone"] == out["epochs"][0]["alone"] == best["alone"]
    assert out["widths"][0]["kd"] == best["kd"]
    assert [c["width"] for c in out["widths"]] == [4, 6]
    assert [c["epochs"] for c in out["epochs"]] == [1, 2]
    # distinct settings give distinct students (the KD loss is in effect)
    assert cells[0]["kd"] != cells[1]["kd"] and cells[0]["kd"] != cells[0]["alone"]
    md = paper.distill_markdown(out)
    assert "| T | alpha 0.5 |" in md and "| 6 | 1 |" in md and "| 4 | 2 |" in md
    rows = paper.distill_rows(out)
    assert rows[1]["experiment"] == "KD: MTJ student distilled from the teacher"
    assert f"T={best['temperature']:g}" in rows[1]["settings"]
    assert paper.distill_figure(out, tmp_path / "kd.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="one hidden layer"):
        paper.distill_sweep(teacher, teacher.__class__(sizes=(8, 4, 4, 3)), data)


def test_transfer_rows_average_over_seeds_and_pair_the_gap():
    result = {
        "seeds": [0, 1, 2], "software_pp": [88.0, 89.0, 90.0],
        "variants": {
            "noisy": {"seeds": [0, 1, 2], "values_pp": [[87.0, 88.0], [89.0, 89.0], [89.5, 90.5]]},
            "sde": {"seeds": [0], "values_pp": [[87.0, 87.5, 88.0]]},
        },
    }  # fmt: skip
    noisy, sde = paper.transfer_rows("x", result)
    # key means 87.5, 89, 90 -> 88.83 ± 1.26 over seeds; paired gaps 0.5, 0, 0
    assert noisy["mtj_pp"] == "88.83 ± 1.26" and noisy["software_pp"] == "89.00 ± 1.00"
    assert noisy["gap_pp"] == "0.17 ± 0.29" and (noisy["seeds"], noisy["noise_keys"]) == (3, 2)
    # one seed: the spread is over its noise keys, against that seed's software network
    assert sde["mtj_pp"] == "87.50 ± 0.50" and sde["software_pp"] == "88.00"
    assert sde["gap_pp"] == "0.50 ± 0.50" and (sde["seeds"], sde["noise_keys"]) == (1, 3)
    assert noisy["experiment"] == "x: deploy, noisy"
