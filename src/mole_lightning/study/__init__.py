"""A miniature data-conflict study of LoRA vs. sparse Mixture of LoRA Experts on synthetic conflicting domains.

`tasks` builds the domains, `base` pretrains (stage 0) and caches the tiny Llama, `methods` trains one method on
one seed, `metrics` holds mutual information and seed statistics, `report` turns results into tables and plots.
The command line is ``tools/conflict_study.py``; the design and results are in ``docs/conflict_study.md``.
"""
