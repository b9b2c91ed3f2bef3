"""Mediator (docs/methods.md section 3): a routing method, registered for its recipe parameters.

The build is a pipeline (plan/routed.py): conflict analysis of every layer, then the
low-conflict layers averaged and the high-conflict ones stored as a dense expert (the mean of
the fine-tunes) plus one sparse top-rho expert per task. With `route_outside`, the tensors that
belong to no layer (embeddings, lm_head, final norm) are routed too: on small models they hold a
large share of each task vector's norm for a few percent of the parameters. Routing happens at
inference.
"""

from .base import MergeMethod, Param, register

register(
    MergeMethod(
        name="mediator",
        merge=None,
        base="required",
        pipeline="mediator",
        params=(
            Param("task", str, None, scope="model", help="task name of this fine-tune (default: its directory name)"),
            Param("route", float, 0.25, min=0, help="layers routed: a fraction of the layers (< 1) or a count (>= 1), by highest conflict"),
            Param("route_threshold", float, -1.0, help="if >= 0: route every layer whose conflict d_l exceeds it (overrides route); negative: off"),
            Param("conflict", str, "elected", choices=("elected", "pairwise"), help="conflict score used to rank layers"),
            Param("denoise_q", float, 1.0, min=0, max=1, help="count only each task's top-q fraction by magnitude (1: all entries)"),
            Param(
                "route_outside",
                bool,
                False,
                help="also route the tensors outside the layers (embeddings, lm_head, final norm) through D + sparse experts",
            ),
            Param("rho", float, 0.1, min=0, max=1, help="density of each sparse expert: top-rho of (theta_t - dense expert)"),
            Param("eta", float, 0.5, min=0, max=1, help="inference: normalised-entropy threshold between top-1 and weighted routing"),
            Param("top_m", int, 0, min=0, help="inference: experts merged when uncertain (0: all)"),
            Param("average", str, "mean", choices=("mean", "task_arithmetic", "ties"), help="how layers that are not routed are averaged"),
            Param("density", float, 0.5, min=0, max=1, help="with average: ties, the TIES density"),
        ),
        summary="average low-conflict layers, route high-conflict ones through a dense + sparse per-task experts",
    )
)
