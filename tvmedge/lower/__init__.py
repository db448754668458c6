"""Target lowering: the Relax pipeline a model goes through before code generation.

``pipeline`` prepares a model (normalize, layout, legalize, fuse) the same way for
compile and tune, then schedules every kernel: tuning records first, our rule-based CPU
schedules (``cpu_rules``) for the rest, and reports which function got what.
``int8_dot`` (with its tensor intrinsics in ``intrin``) sends int8 conv2d/matmul to
hand-scheduled dot-product kernels on CPUs that have the instruction (x86 VNNI, AArch64
``sdot``) before that.
"""
