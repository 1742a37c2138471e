"""Throughput of mtjax's fixed-step fast paths vs cmtj on the paper device; JSON to stdout.

Deterministic: one 1 ns pulse at a fixed 1 ps step (1000 RK4 steps) from +z, for a batch of
P1 currents in [-2, 2] I_s. mtjax: ``mtjax.pulse_ensemble`` (the batched (3, n) scan fast
path, chunks of ``--chunk``, spread over all CPU cores: this script exposes each core as a JAX
device unless XLA_FLAGS is already set), and, for reference, the generic
``jit(vmap(pulse_response(..., solver="rk4_scan")))``; compile time is measured apart
and the compiled call is timed ``--repeats`` times (median, ``block_until_ready``). cmtj:
the same physics (`mtjax.cmtj_bridge`, gamma set to cmtj's) and step, one trajectory after
another in this process (``--cmtj-n`` of them), reported per trajectory; cmtj's final states
are compared with mtjax's.

Thermal: ``--thermal-n`` trajectories of 1 ns at 0.1 ps (10^4 stochastic Heun steps,
``solver="heun_scan"``, one PRNG key per trajectory), and cmtj's stochastic Heun
(temperature driver) for ``--thermal-cmtj-n`` trajectories.

Usage: python benchmarks/device_throughput.py [--quick] [--sizes 1,1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if "XLA_FLAGS" not in os.environ:  # one JAX CPU device per core, before jax is imported
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtjax import DeviceParams, current_scale, pulse_ensemble, pulse_response  # noqa: E402
from mtjax.fileio import atomic_write_bytes  # noqa: E402

T_PULSE = 1e-9
DET_STEPS = 1000  # 1 ps
THERMAL_STEPS = 10_000  # 0.1 ps


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default=None,
        help="comma-separated batch sizes (default 1,1000,16384,131072; --quick: 1,100,1000)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and counts (smoke test)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per size (>= 3)")
    ap.add_argument(
        "--chunk", type=int, default=4096, help="pulse_ensemble chunk_size (trajectories)"
    )
    ap.add_argument(
        "--huge", type=int, default=0, help="also run this many devices (10 steps): peak memory"
    )
    ap.add_argument("--cmtj-n", type=int, default=None, help="cmtj trajectories (default 100)")
    ap.add_argument(
        "--thermal-n", type=int, default=None, help="mtjax thermal trajectories (default 10000)"
    )
    ap.add_argument(
        "--thermal-cmtj-n", type=int, default=None, help="cmtj thermal trajectories (default 20)"
    )
    ap.add_argument("--no-thermal", action="store_true", help="skip the thermal part")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    q = args.quick
    sizes = args.sizes or ("1,100,1000" if q else "1,1000,16384,131072")
    args.sizes = [int(s) for s in sizes.split(",") if s.strip()]
    args.cmtj_n = args.cmtj_n or (20 if q else 100)
    args.thermal_n = args.thermal_n or (256 if q else 10_000)
    args.thermal_cmtj_n = args.thermal_cmtj_n or (4 if q else 20)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")
    if min(args.sizes) < 1 or args.chunk < 1:
        ap.error("sizes and --chunk must be positive")
    return args


def _machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        pass
    try:
        import cmtj

        info["cmtj"] = cmtj.__version__
    except ImportError:
        info["cmtj"] = None
    return info


def _batched(fn, chunk: int, n: int):
    """jit(vmap(fn)) over the leading axis of the arguments; lax.map in chunks if n > chunk."""
    if n <= chunk:
        return jax.jit(jax.vmap(fn))
    return jax.jit(lambda *xs: jax.lax.map(lambda x: fn(*x), xs, batch_size=chunk))


def _time_compiled(fn, args_, repeats: int) -> dict:
    t0 = time.perf_counter()
    compiled = fn.lower(*args_).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args_))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args_))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_call_s": first_s,
        "times_s": times,
        "median_s": statistics.median(times),
    }, out


def _cmtj_det(params, currents, dt):
    from mtjax.cmtj_bridge import cmtj_final_m

    ms, times = [], []
    for i in currents:
        t0 = time.perf_counter()
        ms.append(cmtj_final_m(params, float(i), T_PULSE, dt))
        times.append(time.perf_counter() - t0)
    return np.asarray(ms), times


def _cmtj_thermal(params, currents, dt):
    from mtjax.cmtj_bridge import cmtj_final_m

    times = []
    for k, i in enumerate(currents):
        t0 = time.perf_counter()
        cmtj_final_m(params, float(i), T_PULSE, dt, thermal=True, seed=k + 1)
        times.append(time.perf_counter() - t0)
    return times


def run(args) -> dict:
    try:
        from mtjax.cmtj_bridge import with_cmtj_gamma

        params = with_cmtj_gamma(DeviceParams.paper())
        have_cmtj = True
    except ImportError:
        params = DeviceParams.paper()
        have_cmtj = False
    i_s = float(current_scale(params))
    result = {
        "machine": _machine(),
        "config": {
            "device": "DeviceParams.paper() with gamma = cmtj's (220880 m/(A s) / mu0)",
            "current_scale_A": i_s,
            "currents": "linspace(-2, 2, n) * current_scale",
            "pulse_s": T_PULSE,
            "det_steps": DET_STEPS,
            "det_dt_s": T_PULSE / DET_STEPS,
            "thermal_steps": THERMAL_STEPS,
            "thermal_dt_s": T_PULSE / THERMAL_STEPS,
            "repeats": args.repeats,
            "chunk": args.chunk,
            "dtype": str(jnp.result_type(float)),
            "cmtj_dtype": "float64",
        },
    }

    # ---------------------------------------------------------------- cmtj, deterministic
    cmtj_rate = None
    dt = T_PULSE / DET_STEPS
    if have_cmtj:
        cur = np.linspace(-2, 2, args.cmtj_n) * i_s
        _cmtj_det(params, cur[:2], dt)  # warm-up
        m_cmtj, times = _cmtj_det(params, cur, dt)
        per = statistics.median(times)
        cmtj_rate = 1.0 / per
        fn = jax.jit(
            jax.vmap(lambda i: pulse_response(params, i, solver="rk4_scan", steps=DET_STEPS))
        )
        m_jax = np.asarray(fn(jnp.asarray(cur)))
        result["cmtj"] = {
            "n": args.cmtj_n,
            "total_s": sum(times),
            "per_traj_median_s": per,
            "traj_per_s": cmtj_rate,
            "steps_per_s": cmtj_rate * DET_STEPS,
            "solver": "cmtj RK4, one Junction built per trajectory, final state only logged",
            "max_abs_diff_vs_mtjax_rk4_scan": float(np.abs(m_cmtj - m_jax).max()),
        }
        print(f"[cmtj] {per * 1e3:.3f} ms/trajectory", file=sys.stderr)

    # ---------------------------------------------------------------- mtjax, deterministic
    det = []
    single = lambda i: pulse_response(params, i, solver="rk4_scan", steps=DET_STEPS)
    for n in args.sizes:
        fn = jax.jit(lambda c: pulse_ensemble(params, c, steps=DET_STEPS, chunk_size=args.chunk))
        cur = jnp.linspace(-2.0, 2.0, n) * i_s
        timing, _ = _time_compiled(fn, (cur,), args.repeats)
        rate = n / timing["median_s"]
        row = {
            "batch": n,
            **timing,
            "traj_per_s": rate,
            "steps_per_s": rate * DET_STEPS,
        }
        if n <= 16384:  # the generic single-device path, vmapped, for comparison
            generic, _ = _time_compiled(_batched(single, 1024, n), (cur,), args.repeats)
            row["generic_vmap_pulse_response_traj_per_s"] = n / generic["median_s"]
        if cmtj_rate:
            # cmtj re-timed next to each size: the machine's load may drift during the run
            _, times = _cmtj_det(params, np.linspace(-2, 2, args.cmtj_n) * i_s, dt)
            local = 1.0 / statistics.median(times)
            row["cmtj_traj_per_s"] = local
            row["ratio_mtjax_over_cmtj"] = rate / local
        det.append(row)
        print(
            f"[mtjax rk4_scan] n={n}: compile {timing['compile_s']:.2f} s, "
            f"median {timing['median_s']:.4f} s, {rate:.4g} traj/s",
            file=sys.stderr,
        )
    result["deterministic"] = det

    # ---------------------------------------------------------------- thermal
    if not args.no_thermal:
        n = args.thermal_n
        fn = jax.jit(
            lambda k, c: pulse_ensemble(
                params, c, key=k, steps=THERMAL_STEPS, chunk_size=args.chunk
            )
        )
        cur = jnp.linspace(-2.0, 2.0, n) * i_s
        timing, m = _time_compiled(fn, (jax.random.key(0), cur), args.repeats)
        rate = n / timing["median_s"]
        thermal = {
            "mtjax": {
                "n": n,
                **timing,
                "traj_per_s": rate,
                "steps_per_s": rate * THERMAL_STEPS,
                "time_for_1e4_traj_s": 1e4 / rate,
                "finite": bool(np.all(np.isfinite(np.asarray(m)))),
            }
        }
        print(
            f"[mtjax heun_scan thermal] n={n}: median {timing['median_s']:.3f} s", file=sys.stderr
        )
        if have_cmtj:
            cur_c = np.linspace(-2, 2, args.thermal_cmtj_n) * i_s
            times = _cmtj_thermal(params, cur_c, T_PULSE / THERMAL_STEPS)
            per = statistics.median(times)
            thermal["cmtj"] = {
                "n": args.thermal_cmtj_n,
                "per_traj_median_s": per,
                "traj_per_s": 1 / per,
                "steps_per_s": THERMAL_STEPS / per,
                "time_for_1e4_traj_s": 1e4 * per,
                "solver": "cmtj stochastic Heun (temperature driver)",
            }
            thermal["ratio_mtjax_over_cmtj"] = rate * per
            print(f"[cmtj thermal] {per * 1e3:.2f} ms/trajectory", file=sys.stderr)
        result["thermal"] = thermal
    if args.huge:
        # bounded memory: 10^7-scale batch (few steps: memory does not depend on them)
        import resource

        n = args.huge
        fn = jax.jit(lambda c: pulse_ensemble(params, c, steps=10, chunk_size=args.chunk))
        t0 = time.perf_counter()
        m = fn(jnp.linspace(-2.0, 2.0, n) * i_s).block_until_ready()
        result["huge"] = {
            "n": n,
            "steps": 10,
            "wall_s": time.perf_counter() - t0,
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "finite": bool(jnp.all(jnp.isfinite(m))),
        }
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def main(argv=None) -> int:
    args = _parse(argv)
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
