"""Reaching devices: TVM RPC tracker/server processes, sessions, and emulated boards.

``rpc`` wraps TVM's own RPC (tracker, server, sessions) with process handling and clear
errors; ``sysroot`` prepares the arm64 user space an emulated board runs; ``emulate``
starts a real TVM RPC server under qemu-user registered as a Raspberry Pi.
"""
