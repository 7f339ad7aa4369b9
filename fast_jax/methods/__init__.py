"""Every training method, by its ``--method`` name.

A method is a module with ``make(ctx, *, by_length=True) -> Method``
(:class:`fast_jax.methods.base.Method`); :class:`fast_jax.runner.Runner` trains any of
them. A new method is one module plus one line here (docs/extending.md).
"""

from __future__ import annotations

from typing import Callable

from fast_jax.config import UsageError
from fast_jax.methods import (clover, dropoutnet, fast, ipw, nlba, origin, reference, reg,
                              rows, static, widedeep)
from fast_jax.methods.base import Context, Method

REGISTRY: dict[str, Callable[..., Method]] = {
    "origin": origin.make,
    "static": static.make,
    "fast": fast.make,
    "reg": reg.make,
    "ipw": ipw.make,
    "clover": clover.make,
    "widedeep": widedeep.make,
    "dropoutnet": dropoutnet.make,
    "nlba": nlba.make,
    "global-mean": reference.global_mean,
    "support-mean": reference.support_mean,
    "constant-mode": reference.constant_mode,
}


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """The Method of ``ctx.cfg.method``; ``by_length=False`` runs whole batches (what
  vmapped lanes need: under vmap the by-length parts' ``lax.switch`` runs every branch).
  Origin, Reg, IPW and FAST in step mode share one program (:func:`rows.make`)."""
  try:
    factory = REGISTRY[ctx.cfg.method]
  except KeyError:
    raise UsageError(f"--method {ctx.cfg.method!r}: expected one of "
                     f"{', '.join(REGISTRY)}") from None
  if rows.shares(ctx.cfg):
    return rows.make(ctx, by_length=by_length)
  return factory(ctx, by_length=by_length)
