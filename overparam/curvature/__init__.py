"""Curvature engine: Hessian, GGN and residual operators, Lanczos, SLQ (no Lightning inside)."""
