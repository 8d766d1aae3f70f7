"""Monitoring of served scores: the score log, the KServe payload receiver and the drift job.

Import the submodules directly: `score_log` and `receiver` need only the standard
library, pandas and `cloudevents`, while `drift` also imports Evidently and MLflow, so
the receiver starts without loading them.
"""
