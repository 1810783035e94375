"""A miniature data-conflict study of LoRA vs. sparse Mixture of LoRA Experts on synthetic conflicting domains.

`tasks` builds the domains, `base` pretrains (stage 0) and caches the tiny Llama, `methods` trains one method on
one seed, `multimodal` runs the same comparison on the demo image domains, `metrics` holds seed statistics and the
plug-in bias of mutual information (the mutual information and entropy themselves are
`mole_lightning.eval.routing_analysis`'s), `report` turns results into tables and plots. The command line is
``tools/conflict_study.py``; the design and results are in ``docs/conflict_study.md``.
"""
