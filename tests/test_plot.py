"""mtjax.plot: every function returns Axes whose plotted data are the library's values."""

import os
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import plot
from mtjax.nn import MTJActivation

ROOT = Path(__file__).resolve().parents[1]
Z = np.linspace(-2.5, 2.5, 9)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# variation that keeps the closed form valid (mode="analytic" needs zero effective field)
IDEAL_SPREAD = mtjax.Spreads(hk=0.0, h_bias=0.0)


def _pulse(params, currents):
    """m after one pulse per current, straight from `pulse_response` (independent path)."""
    return np.asarray(jax.vmap(lambda c: mtjax.pulse_response(params, c))(jnp.asarray(currents)))


def _band_width(ax, i, xs):
    """Per-x (max - min) of the vertices of fill_between collection `i`."""
    v = ax.collections[i].get_paths()[0].vertices
    return np.array([np.ptp(v[np.isclose(v[:, 0], x), 1]) for x in xs])


def test_response_of_device_equals_pulse_response():
    p = mtjax.DeviceParams.paper()
    i_s = float(mtjax.current_scale(p))
    ax = plot.response(p, z=Z, x="current")
    assert [ln.get_label() for ln in ax.lines] == ["m·p1", "tanh(z)", "m·p2", "sech(z)"]
    m = _pulse(p, Z * i_s)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), Z * i_s * 1e6, rtol=1e-6)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), m[:, 0], atol=1e-6)
    np.testing.assert_allclose(ax.lines[2].get_ydata(), m[:, 2], atol=1e-6)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), np.tanh(Z))
    # physics: the paper device follows the closed form
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.tanh(Z), atol=1e-4)
    assert "(µA)" in ax.get_xlabel() and "dimensionless" in ax.get_ylabel()
    assert not ax.collections  # no key: no noise band


def test_response_mz2_and_no_reference():
    p = mtjax.DeviceParams.paper(xi1=0.4)
    ax = plot.response(p, z=Z, derivative="mz2", reference=False)
    assert [ln.get_label() for ln in ax.lines] == ["m·p1", "(m·p2)²"]
    m = np.asarray(mtjax.analytic_response(p, Z * mtjax.current_scale(p)).T)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), m[:, 2] ** 2, atol=1e-4)
    assert ax.get_xlabel().startswith("input z") and "dimensionless" in ax.get_xlabel()


def test_response_bands_are_monte_carlo_mean_std():
    noise = 0.05
    act = MTJActivation(read_noise=noise)
    key, n = jax.random.key(3), 64
    ax = plot.response(act, z=Z, key=key, samples=n)
    assert len(ax.lines) == 4 and len(ax.collections) == 2
    keys = jax.random.split(key, n)
    read = jax.jit(jax.vmap(lambda k: jnp.stack(act.read(jnp.asarray(Z), key=k))))
    samples = np.asarray(read(keys))  # (n, 2, z)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), samples[:, 0].mean(0), atol=1e-6)
    np.testing.assert_allclose(ax.lines[2].get_ydata(), samples[:, 1].mean(0), atol=1e-6)
    width = _band_width(ax, 0, Z)
    np.testing.assert_allclose(width, 2 * samples[:, 0].std(0, ddof=1), rtol=1e-4)
    # the band measures the read noise: std = read_noise in units of the signal
    assert abs(width.mean() / 2 - noise) < 0.15 * noise
    # mean within 4 standard errors of the noise-free read-out
    clean = np.asarray(MTJActivation()(jnp.asarray(Z)))
    assert np.all(np.abs(ax.lines[0].get_ydata() - clean) < 4 * noise / np.sqrt(n))


def test_response_thermal_device_band():
    p = mtjax.DeviceParams.paper()
    ax = plot.response(p, z=np.array([-1.0, 0.0, 1.0]), key=jax.random.key(0), samples=24)
    width = _band_width(ax, 0, [-1.0, 0.0, 1.0])
    assert np.all(width > 0.01)  # 300 K spreads m_x
    assert np.all(np.abs(ax.lines[0].get_ydata() - np.tanh([-1, 0, 1])) < 0.1)


def test_response_input_scale():
    p = mtjax.DeviceParams.paper(pulse_duration=2e-9)  # twice the gain at the same current
    i_s = float(mtjax.current_scale(mtjax.DeviceParams.paper()))
    ax = plot.response(p, z=Z, input_scale=i_s, reference=False)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.tanh(2 * Z), atol=1e-4)
    with pytest.raises(ValueError, match="input_scale"):
        plot.response(p, z=Z, input_scale=-1.0)
    with pytest.raises(ValueError, match="input_scale"):
        plot.response(MTJActivation(mode="ideal"), z=Z, input_scale=1e-4)


def test_response_errors():
    with pytest.raises(ValueError, match="key"):
        plot.response(MTJActivation(read_noise=0.1), z=Z)  # stochastic needs a key
    with pytest.raises(ValueError, match="x: choose"):
        plot.response(mtjax.DeviceParams.paper(), x="volts")
    with pytest.raises(ValueError, match="derivative"):
        plot.response(mtjax.DeviceParams.paper(), z=Z, derivative="sech")
    devs = mtjax.sample_devices(mtjax.DeviceParams.paper(), jax.random.key(0), 3, IDEAL_SPREAD)
    with pytest.raises(ValueError, match="population"):
        plot.response(MTJActivation(devs, mode="analytic"), z=Z)
    with pytest.raises(ValueError, match="samples"):
        plot.response(mtjax.DeviceParams.paper(), z=Z, key=jax.random.key(0), samples=1)


def test_trajectory_sphere():
    p = mtjax.DeviceParams.paper(p1=(1.0, 1.0, 0.0))
    traj = mtjax.simulate(p, 2 * mtjax.current_scale(p), 1e-9, saveat=41)
    ax = plot.trajectory_sphere(traj, params=p)
    assert ax.name == "3d"
    (line,) = ax.lines
    np.testing.assert_allclose(np.stack(line.get_data_3d(), axis=1), traj.ms, atol=1e-7)
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    assert set(texts) == {"P1", "P2"}
    assert texts["P1"][0] == pytest.approx(texts["P1"][1])  # P1 along (1, 1, 0)
    assert "dimensionless" in ax.get_zlabel()
    with pytest.raises(ValueError, match="3-D"):
        plot.trajectory_sphere(traj, ax=plot.response(p, z=Z))


def test_readout_histogram_counts_and_mean():
    act = MTJActivation(read_noise=0.05)
    ax = plot.readout_histogram(act, 0.5, key=jax.random.key(1), samples=2000)
    assert len(ax.containers) == 2
    for bars, ref in zip(ax.containers, (np.tanh(0.5), 1 / np.cosh(0.5)), strict=True):
        counts = np.array([b.get_height() for b in bars])
        centers = np.array([b.get_x() + b.get_width() / 2 for b in bars])
        assert counts.sum() == 2000
        assert abs((counts * centers).sum() / 2000 - ref) < 0.006  # 2.7 standard errors
    assert [ln.get_xdata()[0] for ln in ax.lines] == pytest.approx([np.tanh(0.5), 1 / np.cosh(0.5)])
    with pytest.raises(ValueError, match="key"):
        plot.readout_histogram(act, 0.5, key=None)
    # per-neuron devices: every neuron of every read pooled
    devs = mtjax.sample_devices(mtjax.DeviceParams.paper(), jax.random.key(2), 4, IDEAL_SPREAD)
    act = MTJActivation(devs, mode="analytic", read_noise=0.02)
    ax = plot.readout_histogram(act, -1.0, key=jax.random.key(3), samples=50)
    assert [sum(b.get_height() for b in bars) for bars in ax.containers] == [200, 200]


def test_population_device_curves():
    p = mtjax.DeviceParams.paper()
    devs = mtjax.sample_devices(p, jax.random.key(0), 5, mtjax.Spreads.relative(0.1))
    ax = plot.population(devs, nominal=p, z=Z)
    assert len(ax.lines) == 5 + 1 + 1
    assert [ln.get_label() for ln in ax.lines[-2:]] == ["nominal", "tanh(z)"]
    i_s = float(mtjax.current_scale(p))  # every device sees the nominal design current
    for i in (0, 4):
        dev = jax.tree.map(lambda x, i=i: x[i], devs)
        np.testing.assert_allclose(ax.lines[i].get_ydata(), _pulse(dev, Z * i_s)[:, 0], atol=1e-5)
    np.testing.assert_allclose(ax.lines[5].get_ydata(), np.tanh(Z), atol=1e-4)
    assert ax.lines[5].get_linewidth() > ax.lines[0].get_linewidth()


def test_population_of_activation_p2():
    devs = mtjax.sample_devices(mtjax.DeviceParams.paper(), jax.random.key(2), 4, IDEAL_SPREAD)
    act = MTJActivation(devs, mode="analytic")
    ax = plot.population(act, z=Z, which="p2", x="current")
    assert len(ax.lines) == 4 + 1 and ax.lines[-1].get_label() == "sech(z)"
    expected = np.stack([np.asarray(act.read(jnp.full(4, z))[1]) for z in Z])  # (z, device)
    for i in range(4):
        np.testing.assert_allclose(ax.lines[i].get_ydata(), expected[:, i], atol=1e-6)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), Z * float(act.input_scale) * 1e6)
    with pytest.raises(ValueError, match="which"):
        plot.population(act, which="p3")


@pytest.mark.parametrize("mode", ["thermal", "table"])
def test_population_of_a_noisy_activation_draws_the_noise_free_curves(mode):
    hot = mtjax.DeviceParams.paper(temperature=300.0)
    devs = mtjax.sample_devices(hot, jax.random.key(2), 3, IDEAL_SPREAD)
    act = MTJActivation(devs, mode=mode, read_noise=0.05, n_grid=33)
    clean = MTJActivation(devs, mode="table", n_grid=33)
    ax = plot.population(act, z=Z)
    for i in range(3):
        expected = np.asarray([clean(jnp.full(3, z))[i] for z in Z])
        np.testing.assert_allclose(ax.lines[i].get_ydata(), expected, atol=1e-6)


def test_sweep_matches_closed_form():
    p = mtjax.DeviceParams.paper()
    ax1, ax2 = plot.sweep(p, "xi1", [0.0, 0.5, 1.0], z=Z)
    assert len(ax1.lines) == len(ax2.lines) == 4
    assert ax1.lines[1].get_label() == "xi1 = 0.5"
    i_s = mtjax.current_scale(p)
    for i, xi in enumerate((0.0, 0.5, 1.0)):
        m = np.asarray(mtjax.analytic_response(p.replace(xi1=xi), Z * i_s).T)
        np.testing.assert_allclose(ax1.lines[i].get_ydata(), m[:, 0], atol=1e-4)
        np.testing.assert_allclose(ax2.lines[i].get_ydata(), m[:, 2], atol=1e-4)
    # field-like torque tilts m out of the xz-plane: m_z drops below sech, m_x stays tanh
    assert np.all(ax2.lines[2].get_ydata() <= 1 / np.cosh(Z) + 1e-6)
    assert ax2.lines[2].get_ydata().min() < 0


def test_sweep_labels_and_errors():
    p = mtjax.DeviceParams.paper()
    axes = plot.sweep(p, "pulse_duration", [1e-9, 2e-9, 5e-10], z=Z, reference=False)
    labels = [ln.get_label() for ln in axes[0].lines]
    assert labels == [f"pulse_duration = {t} ns" for t in ("1", "2", "0.5")]
    h_labels = [ln.get_label() for ln in plot.sweep(p, "h_bias", [(1e3, 0, -2.5e3)], z=Z)[1].lines]
    assert h_labels == ["h_bias = (1000, 0, -2500) A/m", "sech(z)"]
    with pytest.raises(ValueError, match="name"):
        plot.sweep(p, "colour", [1.0])
    with pytest.raises(ValueError, match="hk_axis"):
        plot.sweep(p, "hk_axis", [(0.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="axes: expected 2"):
        plot.sweep(p, "xi1", [0.1], axes=[axes[0]])


HISTORY = [
    {"event": "step", "step": 10, "epoch": 0, "train_loss": 1.2},
    {"event": "step", "step": 20, "epoch": 0, "train_loss": 0.9},
    {"event": "epoch", "step": 20, "epoch": 1, "train_loss": 1.0, "test_loss": 0.8,
     "test_accuracy": 0.7},
    {"event": "step", "step": 30, "epoch": 1, "train_loss": 0.7},
    {"event": "nonfinite", "step": 31, "epoch": 1, "train_loss": None},
    {"event": "epoch", "step": 40, "epoch": 2, "train_loss": 0.7, "test_loss": 0.6,
     "test_accuracy": 0.8},
]  # fmt: skip


def test_training_curves():
    ax_loss, ax_acc = plot.training_curves(HISTORY)
    assert len(ax_loss.lines) == 3 and len(ax_acc.lines) == 1
    np.testing.assert_allclose(ax_loss.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(ax_loss.lines[2].get_ydata(), [0.8, 0.6])
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [70.0, 80.0])
    assert ax_acc.get_ylabel() == "test accuracy (%)" and "(nats)" in ax_loss.get_ylabel()
    # overlay a second run on the same axes
    plot.training_curves(HISTORY[:3], [ax_loss, ax_acc], label="b")
    assert len(ax_acc.lines) == 2 and ax_acc.lines[1].get_label() == "b"
    with pytest.raises(ValueError, match="history"):
        plot.training_curves([{"event": "nonfinite"}])


def test_accuracy_curves():
    ax = plot.accuracy_curves({"a": HISTORY, "b": HISTORY[:3]})
    assert [ln.get_label() for ln in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [70.0, 80.0])
    with pytest.raises(ValueError, match="'b'"):
        plot.accuracy_curves({"a": HISTORY, "b": HISTORY[:2]})


RESULT = {
    "variation": [0.0, 0.1, 0.2],
    "read_noise": [0.0, 0.05],
    "software_accuracy_pp": 88.0,
    "accuracy_pp": {
        "inference": [[88.0, 87.0], [85.0, 84.0], [80.0, 70.0]],
        "training": [[88.5, 87.5], [87.0, 86.0], [86.0, 85.0]],
    },
}


def test_robustness_heatmaps():
    axes = plot.robustness_heatmaps(RESULT)
    assert len(axes) == 2
    for ax, grid in zip(axes, RESULT["accuracy_pp"].values(), strict=True):
        (im,) = ax.images
        np.testing.assert_allclose(im.get_array(), grid)
        assert im.get_clim() == (70.0, 88.5)  # common color scale
        assert len(ax.texts) == 6
    assert "relative" in axes[0].get_ylabel() and "normalized" in axes[0].get_xlabel()
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "0.05"]
    bad = RESULT | {"variation": [0.0, 0.1]}
    with pytest.raises(ValueError, match="shape"):
        plot.robustness_heatmap(bad)
    with pytest.raises(ValueError, match="grid"):
        plot.robustness_heatmap(RESULT, "deploy")


def test_energy_accuracy():
    fronts = {"mtj": [(1e-12, 88.0, 0.3), (1e-13, 85.0, 0.5)], "cmos": [(1e-11, 89.0, 0.1)]}
    ax = plot.energy_accuracy(fronts)
    assert len(ax.containers) == 2 and ax.get_xscale() == "log"
    data_line = ax.containers[0].lines[0]
    np.testing.assert_allclose(data_line.get_xdata(), [1e-13, 1e-12])  # sorted by energy
    np.testing.assert_allclose(data_line.get_ydata(), [85.0, 88.0])
    assert "(J)" in ax.get_xlabel() and "(%)" in ax.get_ylabel()
    with pytest.raises(ValueError, match="'bad'"):
        plot.energy_accuracy({"bad": [(0.0, 80.0, 1.0)]})
    with pytest.raises(ValueError, match="triples"):
        plot.energy_accuracy({"x": [(1e-12, 80.0)]})


def test_save_writes_png_atomically(tmp_path, monkeypatch):
    ax = plot.accuracy_curves({"a": HISTORY})
    path = plot.save(ax, tmp_path / "sub" / "acc.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert os.listdir(path.parent) == ["acc.png"]  # no temporary file left behind
    axes = plot.training_curves(HISTORY)
    assert plot.save(axes, tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    # a failing render leaves the old file untouched
    fig = ax.figure
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        plot.save(fig, path)
    assert path.read_bytes() == data and os.listdir(path.parent) == ["acc.png"]
    with pytest.raises(ValueError, match=r"\.png"):
        plot.save(ax, tmp_path / "a.pdf")
    with pytest.raises(TypeError, match="fig_or_ax"):
        plot.save("not a figure", tmp_path / "b.png")


def test_wrappers_write_png(tmp_path):
    from mtjax import experiments, paper

    assert experiments.plot_curves({"a": HISTORY}, tmp_path / "c.png").stat().st_size > 1000
    assert paper.robustness_heatmap(RESULT, tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)


def test_device_demo_figure(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "device_demo.py"))["main"]
    main(["--points", "3", "--figure", str(tmp_path / "demo.png")])
    assert (tmp_path / "demo.png").read_bytes().startswith(PNG_MAGIC)
    assert "demo.png" in capsys.readouterr().out
