"""A VTA-style int8 accelerator as a software-defined design: its instruction set
(:mod:`.isa`), the queues and dependency tokens (:mod:`.queues`), a bit-exact functional
simulator (:mod:`.sim`), a timing model (:mod:`.timing`), the Relax offload
(:mod:`.partition`, :mod:`.codegen`, :mod:`.offload`, :mod:`.report`), its tuning
(:mod:`.tune`), the host-side function that runs offloaded layers on the simulator
(:mod:`.runtime`) and the emulated board over RPC (:mod:`.board`, :mod:`.serve`). The
hardware parameters are data: the ``"accelerator"`` section of ``targets/vta-*.json``.
All accelerator figures are simulated, not measured on an FPGA.
"""
