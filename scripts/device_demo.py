"""Print the tanh/sech response table of the default (paper) device; optionally save a figure."""

import argparse

import jax
import jax.numpy as jnp

import mtjax


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=13, help="rows in [-3, 3] (>= 2)")
    parser.add_argument(
        "--figure", metavar="PNG", help="also save m_x, m_z vs P1 current against tanh, sech"
    )
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error("--points must be >= 2")
    if args.figure is not None and not args.figure.lower().endswith(".png"):
        parser.error("--figure must be a .png path")
    p = mtjax.DeviceParams.paper()
    i_s = mtjax.current_scale(p)
    us = jnp.linspace(-3.0, 3.0, args.points)
    ms = jax.jit(jax.vmap(lambda u: mtjax.pulse_response(p, u * i_s)))(us)
    print(f"paper device: I_s = {float(i_s) * 1e6:.2f} uA (current giving u = 1), tau = 1 ns")
    print(f"{'u':>6} {'I (uA)':>9} {'m_x':>9} {'tanh(u)':>9} {'m_z':>9} {'sech(u)':>9}")
    for u, m in zip(us, ms, strict=True):
        print(
            f"{float(u):6.2f} {float(u * i_s) * 1e6:9.2f} {float(m[0]):9.5f} "
            f"{float(jnp.tanh(u)):9.5f} {float(m[2]):9.5f} {float(1 / jnp.cosh(u)):9.5f}"
        )
    if args.figure is not None:
        ax = mtjax.plot.response(p, x="current")
        ax.set_title("paper device, one 1 ns pulse from +z")
        print(f"figure: {mtjax.plot.save(ax, args.figure)}")


if __name__ == "__main__":
    main()
