"""Evaluation the way the papers report it: pass@1 over k samples, cons@k, pass@k, bootstrap intervals.

stats.py holds the estimators, runner.py samples and scores (`evaluate`), command.py is `ponder eval`.
"""
