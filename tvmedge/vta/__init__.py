"""A VTA-style int8 accelerator as a software-defined design: its instruction set
(:mod:`.isa`), a bit-exact functional simulator (:mod:`.sim`), a timing model
(:mod:`.timing`), the Relax offload (:mod:`.partition`, :mod:`.codegen`) and the host-side
function that runs offloaded layers on the simulator (:mod:`.runtime`). The hardware
parameters are data: the ``"accelerator"`` section of ``targets/vta-*.json``.
All figures are simulated, not measured on an FPGA.
"""
