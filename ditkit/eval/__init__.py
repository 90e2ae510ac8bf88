"""Evaluation: ADM-format npz I/O, feature networks, metrics, the Fashion-MNIST classifier, `ditkit eval`."""
