"""Planning: which output tensors exist, from which inputs, with which parameters and row blocks
(planner.py), and the routing methods' phases (routed.py, which builds their per-tensor jobs
from methods/onebit.py and methods/mediator.py). Imports recipe/, checkpoints/, methods/,
analysis/ and encodings/ (output layouts); used by engine/ and export/."""
