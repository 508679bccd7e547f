"""The method and its measurements, with no tracking, orchestration or data-versioning system:
what a GPU machine with only torch, torchvision, numpy, scikit-learn, onnx and onnxruntime runs.
config and gates are pure Python (PyYAML) so that the server can read them without torch."""
