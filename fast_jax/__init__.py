"""fast-jax: fairness-aware meta-learned user models for cold start in JAX/Flax.

FAST (Zhang et al., WWW 2024) adaptive group sampling, CLOVER (Wei & He, KDD 2022),
their MeLU / MetaCS backbones and the baselines of the FAST paper's Table 2.

Entry points: :func:`fast_jax.experiment.train_and_evaluate` (one configuration, N seeds),
:class:`fast_jax.runner.Runner` (any method, one seed or vmapped lanes), the methods in
:mod:`fast_jax.methods` (FAST's Algorithm 1 in :mod:`fast_jax.methods.fast`), and the
pure pieces in :mod:`fast_jax.meta` (inner loop), :mod:`fast_jax.fairness` (p update,
resampling, samplers) and :mod:`fast_jax.metrics`.
"""

__version__ = "0.1.0"
