"""Evaluation: the held-out report of ``dmdiff evaluate`` (:mod:`~dmdiff.evaluation.job`), the methods
it measures (:mod:`~dmdiff.evaluation.methods`), the classical baselines and their tuning
(:mod:`~dmdiff.evaluation.baselines`), the report files (:mod:`~dmdiff.evaluation.report`), sentences
generated from its numbers (:mod:`~dmdiff.evaluation.discussion`) and the fidelity–perception sweep
along α (:mod:`~dmdiff.evaluation.tradeoff`)."""
