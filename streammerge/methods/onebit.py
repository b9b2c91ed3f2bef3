"""1bit-Merging (docs/methods.md section 4): a routing method, registered for its recipe parameters.

The build is a pipeline (plan/routed.py): conflict/norm analysis, a per (task, module kind)
precision plan, 1-bit task vectors (sign bits + scale) and the static fallback
theta_0 + lambda * TIES(all). Routing between tasks happens at inference.
"""

from .base import MergeMethod, Param, register

register(
    MergeMethod(
        name="1bit",
        merge=None,
        base="required",
        pipeline="1bit",
        params=(
            Param("task", str, None, scope="model", help="task name of this fine-tune (default: its directory name)"),
            Param(
                "task_type",
                str,
                None,
                scope="model",
                choices=("chat", "general", "math", "code"),
                help="for preset paper: chat/general keep attention, math/code keep MLP (default: guessed from the task name)",
            ),
            Param("preset", str, "auto", choices=("paper", "auto", "uniform"), help="precision plan per (task, module kind)"),
            Param("coverage", float, 0.8, min=0, max=1, help="preset auto: keep the module kinds holding this share of a task's squared norm"),
            Param("bits", int, 1, min=1, max=2, help="sign bits per entry of a 1-bit precision: 2 adds the residual's sign and a second scale per row"),
            Param("scale", str, "absmean", choices=("absmean", "rms"), help="1-bit scale: mean|tau| (least squares) or ||tau||/sqrt(n) (keeps the norm)"),
            Param("granularity", str, "tensor", choices=("tensor", "row"), help="one scale per tensor or per output row"),
            Param("lambda", float, 1.0, min=0, help="weight of the other tasks' TIES merge (dynamic) and of the static fallback"),
            Param("rho", float, 0.1, min=0, max=1, help="density of 'sparse' precision entries"),
        ),
        summary="1-bit task vectors targeted by module kind, merged per prompt by a router; static fallback theta_0 + TIES",
    )
)
