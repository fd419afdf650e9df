"""MetaSchedule tuning on the local machine, with the database kept in the artifact folder.

Tuning runs on the Relax module after legalization and fusion (``build.fuse``), each fused
kernel being one task; the best schedules are stored as a JSON database and applied with
``MetaScheduleApplyDatabase`` before the default lowering (``build.lower``). A second compile
of the same model reuses the records already in the database.

TVM 0.27's default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (43-53 s on
these machines), longer than its own timeout, so every build would fail: ``build_candidate``
does the same build without that import. It is a module-level function so that the worker
process can import it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrdeploy.targets.build import tvm_target
from lrdeploy.targets.devices import Device

BUILD_TIMEOUT_S = 120


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """A MetaSchedule candidate built as the default builder does, minus tensor_intrin."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def tune(fused: Any, device: Device, work_dir: Path, trials: int,
         progress: Callable[[str], None]) -> None:
    """Tune the kernels of ``fused`` (``build.fuse``) for ``device`` on this machine, adding
    records to ``work_dir``."""
    from tvm.s_tir import meta_schedule as ms

    target = tvm_target(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(fused, target, {})
    progress(f"tuning {len(tasks)} kernels with MetaSchedule, {trials} trials in all")
    ms.relax_integration.tune_relax(
        mod=fused,
        params={},
        target=target,
        work_dir=str(work_dir),
        max_trials_global=trials,
        max_trials_per_task=max(1, trials // max(len(tasks), 1)),
        num_trials_per_iter=min(16, trials),
        builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=BUILD_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S),
    )

