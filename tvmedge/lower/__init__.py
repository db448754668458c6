"""Target lowering: the Relax pipeline a model goes through before code generation.

``pipeline`` prepares a model (normalize, layout, legalize, fuse) the same way for
compile and tune, then schedules every kernel: tuning records first, our rule-based CPU
schedules (``cpu_rules``) for the rest, and reports which function got what.
"""
