"""Using a trained model: calibrated confidence, the not-a-leukocyte checks, test-time augmentation, Grad-CAM,
ONNX Runtime, and the report a researcher reads."""
