"""The crossrank Kubeflow pipeline."""
