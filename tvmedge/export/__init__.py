"""Write an (optimized) model out of tvmedge for other runtimes: :mod:`.onnx` (standard ONNX,
int8 as QDQ), checked by running the file in ONNX Runtime and OpenVINO (:mod:`.verify`)."""
