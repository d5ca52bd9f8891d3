"""``overparam connect``: fit a Bezier curve (or polygonal chain) between two finished runs.

    overparam connect --a RUN_OR_CKPT --b RUN_OR_CKPT [--path bezier|polychain] [--bends 1]
                      [--steps 1000] [--lr 0.05] [--points 25] [--out connection]

Trains the middle control point(s) with the two runs' weights fixed at the ends, minimising
``E_{t ~ U[0,1]} L(phi(t))`` over the training set (Garipov et al. 2018, Sec. 3.2), then
evaluates the linear path and the found curve and writes both into ``--out``: ``curve.npz``
(with the control points, reusable by ``overparam interpolate --path bezier --curve``),
``curve.png`` and ``barriers.json``. Takes every option of ``overparam interpolate``.
"""

from __future__ import annotations

from overparam.commands import interpolate


def main(argv: list[str]) -> int:
    return interpolate.main(argv, prog="overparam connect", default_path="bezier", default_out="connection", description=__doc__.split("\n\n")[0])
