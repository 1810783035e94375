"""Adapters to the tools users already run on a trained model: the lmms-eval model (:mod:`.lmms_eval`)."""
