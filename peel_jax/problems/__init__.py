"""What the engine solves: each module defines one family of per-image problems on :mod:`peel_jax.solver.engine`.

* :mod:`~peel_jax.problems.block`: a residual block (or the unpooled stem), reduced or lifted formulation.
* :mod:`~peel_jax.problems.stem`: the max/avg-pooled stem, without argmax indices.
* :mod:`~peel_jax.problems.refine`: the whole map pixels -> layer (end-to-end refinement).
"""
