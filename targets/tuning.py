"""MetaSchedule tuning on the local machine, with the database kept in the artifact folder, and
schedules sampled without measuring for boards that cannot be tuned here.

Tuning runs on the Relax module after legalization and fusion (``build.fuse``), each fused
kernel being one task; the best schedules are stored as a JSON database and applied with
``MetaScheduleApplyDatabase`` before the default lowering (``build.lower``). A second compile
of the same model reuses the records already in the database.

TVM 0.27's default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (43-53 s on
these machines), longer than its own timeout, so every build would fail: ``build_candidate``
does the same build without that import. It is a module-level function so that the worker
process can import it by name.

TVM 0.27's CPU pipeline (``relax/backend/cpu_generic``) legalizes and fuses but schedules
nothing, and dlight's CPU rules cover only GEMV and reduction: an untuned matmul is a plain loop
nest (MiniLM-L3's 128 x 384 x 1536 FFN kernel ran at about 0.8 GFLOP/s here). ``sample``
takes, for every kernel, the first schedule of MetaSchedule's design space for the target
(multi-level tiling, parallel outer loops, vectorized inner ones, with its tile sizes drawn at
random under a fixed seed) and stores it as tuning would, measuring nothing: it needs no board.
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


def sample(fused: Any, device: Device, work_dir: Path, progress: Callable[[str], None],
           seed: int = 1) -> int:
    """Store one schedule per kernel of ``fused``, sampled from its design space for
    ``device`` without measuring, in the database at ``work_dir``; returns how many kernels got
    one (a kernel whose sample the target's postprocessors reject keeps the default)."""
    from tvm.s_tir import meta_schedule as ms

    target = tvm_target(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    tasks = ms.relax_integration.extract_tasks(fused, target, {})
    progress(f"sampling a schedule for each of {len(tasks)} kernels (loading MetaSchedule)")
    sampled = 0
    for index, task in enumerate(tasks):
        kernel = task.dispatched[0]
        context = ms.TuneContext(mod=kernel, target=target, space_generator="post-order-apply",
                                 rand_state=seed + index, num_threads=1)
        schedule = context.generate_design_space()[0]
        if not all(postproc.apply(schedule) for postproc in context.space_generator.postprocs):
            continue
        workload = database.commit_workload(kernel)
        # run_secs is what a query ranks records by; one record per kernel, so any value.
        database.commit_tuning_record(ms.database.TuningRecord(
            schedule.trace, workload, [1.0], target,
            ms.arg_info.ArgInfo.from_prim_func(kernel["main"])))
        sampled += 1
    return sampled
