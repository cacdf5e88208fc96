"""The ladder's allocation, calibrated: which rung each difficulty bin gets on the device.

On the calibration split (train items whose records hold the remote's verdict, with best-of-N
and revision outcomes: ``python -m rpra.benchmarks.best_of_n --split train``), ``rpra.ladder.allocate``
gives each bin of the probe's P(pass) (out of fold) the action with the best mean quality minus
its price: device seconds at ``benchmarks.policies.LOCAL_PRICE`` and a remote call at ``price``.
Without a price, the lowest price whose calibration remote share is at most ``remote_share`` (the
same choice the benchmark's allocation row makes). Nothing here reads a test split.
"""

from __future__ import annotations

from pathlib import Path

from rpra.config import Settings
from rpra.errors import RpraError
from rpra.ladder import Allocation, default_allocation_path


def fit_allocation(settings: Settings, *, remote_share: float | None = None, price: float | None = None,
                   output: Path | None = None) -> tuple[Path, Allocation]:  # fmt: skip
    """Calibrate the allocation and save it (by default next to the model, ``<model>.ladder.json``)."""
    from rpra.benchmarks.bench import bench_settings, ladder_calibration
    from rpra.benchmarks.policies import BINS, LOCAL_PRICE, REMOTE_PRICES, TARGET_SHARE, allocation_policy, within_share
    from rpra.models import file_sha256, resolve

    settings = bench_settings(settings)
    calibration = ladder_calibration(settings)
    if calibration is None:
        raise RpraError(f"No calibration split for {settings.model}: it needs the probe (`rpra train probe`) and best-of-N rows on "
                        f"train items (`python -m rpra.benchmarks.best_of_n --model {settings.model} --split train`).")  # fmt: skip
    share = TARGET_SHARE if remote_share is None else remote_share
    asked = None if price is not None else share  # what the price was chosen for (none when a price was given)
    if price is None:
        swept = [dict(zip(("price", "edges", "actions", "calibration_share"), (p, *allocation_policy(calibration, p)))) for p in REMOTE_PRICES]
        chosen = within_share(swept, share)
        price, edges, actions, cal_share = chosen["price"], chosen["edges"], chosen["actions"], chosen["calibration_share"]
    else:
        edges, actions, cal_share = allocation_policy(calibration, price)
    model_path = resolve(settings.model)
    allocation = Allocation(tuple(edges), tuple(actions), {
        "model": settings.model, "model_sha256": file_sha256(model_path), "remote_price": price, "local_price": LOCAL_PRICE,
        "bins": BINS, "calibration_share": cal_share, "calibration_items": calibration["items"],
        "calibration_suites": calibration["suites"], "remote_share_asked": asked,
    })  # fmt: skip
    return allocation.save(output or default_allocation_path(model_path)), allocation
