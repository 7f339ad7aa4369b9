"""Rows as lanes: meta-learning methods that differ only in their outer objective.

Origin, Reg, IPW and FAST in step mode draw their batches the same way (every user once
per epoch, shuffled) and differ only in how the outer step weighs the batch (uniform,
IPW's inverse group shares, FAST's B' resampled with p), in its penalty (Reg's) and in
whether p moves (FAST's). Runs of these methods at otherwise identical settings can
therefore train as lanes of one vectorised program, as seeds and FAST's gamma and tau
do (:meth:`fast_jax.runner.Runner.run_lanes`): each lane carries the index of its
method in ``state.hyper["row"]`` and takes that method's p, weights and penalty
(:class:`fast_jax.methods.fast.Objective`'s ``rows``). A lane's keys, batches and
initial parameters are those of the method's own run, so its results are the run's up
to floating-point reassociation (``tests/test_resume.py``).

The same holds for a run on its own: :func:`make` builds each of these methods on the
one program of all four rows, its own row chosen by ``state.hyper["row"]``, so at equal
settings the four runs compile one program between them and the persistent compilation
cache (:mod:`fast_jax.compile_cache`) serves the other three (a Table 2 block's Origin,
Reg, IPW and FAST rows of a backbone compile once instead of four times). The extra
rows' terms are a few operations on the batch's B users; the epoch is as fast as the
method's own program, and its results are the same up to rounding (EXPERIMENTS.md,
Speed; ``tests/test_rows.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

from fast_jax.config import Config
from fast_jax.methods import fast, ipw, origin, reg
from fast_jax.methods.base import Context, Method

# The methods that can share a program, and their objectives.
OBJECTIVES: dict[str, Callable[[Context], fast.Objective]] = {
    "origin": lambda ctx: origin.OBJECTIVE,
    "reg": reg.objective,
    "ipw": ipw.objective,
    "fast": fast.objective,
}


def joins(cfg: Config) -> bool:
  """Whether a run of ``cfg`` can be a row lane: one of :data:`OBJECTIVES`, FAST in step
  mode (in epoch mode its sampler draws from p, and p moves on the host)."""
  return cfg.method in OBJECTIVES and not (cfg.method == "fast" and cfg.p_update == "epoch")


def objective(ctx: Context, methods: Sequence[str]) -> fast.Objective:
  """One objective whose lanes take ``methods[state.hyper["row"]]``'s."""
  rows = tuple(OBJECTIVES[m](ctx) for m in methods)
  if {o.sampler for o in rows} != {"uniform"} or any(o.p_rule == "epoch" for o in rows):
    raise ValueError(f"{', '.join(methods)}: rows as lanes need the uniform sampler and no "
                     "end-of-epoch p")
  p_rule = "step" if any(o.p_rule == "step" for o in rows) else "none"
  return fast.Objective("uniform", p_rule, rows[0].weights, rows[0].penalty, rows=rows)


def maker(methods: Sequence[str]) -> Callable[..., Method]:
  """``make(ctx, *, by_length) -> Method`` of the meta-learner whose lanes are the rows
  ``methods`` (for :class:`fast_jax.runner.Runner`'s ``make``)."""
  methods = tuple(methods)

  def make(ctx: Context, *, by_length: bool = True) -> Method:
    return fast.meta_method(ctx, objective(ctx, methods), by_length=by_length)
  return make


# Whether :func:`fast_jax.methods.make` builds Origin, Reg, IPW and FAST (step mode) on
# the program of all four rows (:func:`make`); False gives each method its own program
# (what tests/test_rows.py compares with).
SHARED_PROGRAM = True


def shares(cfg: Config) -> bool:
  """Whether a run of ``cfg`` trains on the program of all four rows (:func:`make`)."""
  return SHARED_PROGRAM and joins(cfg)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``ctx.cfg.method``'s Method on the program of every row of :data:`OBJECTIVES`, its
  initial state carrying the method's row (``state.hyper["row"]``)."""
  methods = tuple(OBJECTIVES)
  method = maker(methods)(ctx, by_length=by_length)
  row = jnp.float32(methods.index(ctx.cfg.method))

  def init(key):
    state = method.init(key)
    return state.replace(hyper={**state.hyper, "row": row})
  return method._replace(init=init)
