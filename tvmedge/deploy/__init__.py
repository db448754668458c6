"""Reaching devices: TVM RPC tracker/server processes, sessions, and emulated boards.

Over TVM's own RPC: ``address`` parses and prints ``host:port``; ``tracker`` speaks the
tracker's protocol (device lists, requests, waiting for a tracker); ``launch`` runs
tracker and server processes that can be stopped for good (``procfs`` finds a process
group's members, ``orphan_guard`` stops a group whose starter died); ``session`` opens
sessions with bounded waits. ``sysroot`` prepares the arm64 user space an emulated board
runs; ``emulate`` starts a real TVM RPC server under qemu-user registered as a Raspberry
Pi; ``cli`` is ``tvmedge device``.
"""
