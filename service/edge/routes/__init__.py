"""One router per concern: classification, Open Inference Protocol v2, admin, metrics."""
