"""Mixed-integer back-ends of the disaggregation attack.

HiGHS (``scipy.optimize.milp``) is the default and always present; SCIP (PySCIPOpt,
``pip install 'gradleak[scip]'``) and Gurobi (gurobipy, ``pip install 'gradleak[gurobi]'``, which
needs a licence beyond its size-limited one for large federations) are used when installed. Each
solves the same program,

    min c x   subject to   row_lb <= A x <= row_ub,   lb <= x <= ub,   x_j integer where marked,

on one thread (the attack runs clients in parallel processes), and reports whether it proved a
solution: a time-out or an infeasible program is a failure, never a guess.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from gradleak.errors import ConfigError

SOLVERS = {"highs": None, "scip": "pyscipopt", "gurobi": "gurobipy"}  # name -> module it needs


@dataclass(frozen=True)
class Program:
    """``min c x`` over ``row_lb <= a x <= row_ub``, ``lb <= x <= ub``, integer where
    ``integrality``."""

    c: np.ndarray
    a: csr_matrix
    row_lb: np.ndarray
    row_ub: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray  # 1: integer, 0: continuous


@dataclass(frozen=True)
class Outcome:
    x: np.ndarray | None  # None unless the solver proved an optimal (for c = 0: feasible) point
    status: str  # "optimal", or what stopped the solver, in its own words
    timed_out: bool = False  # the time limit stopped it (no proof either way)


def check_solver(name: str, key: str = "disaggregation.solver") -> None:
    """Raise a ConfigError naming the package to install when ``name`` cannot run here."""
    if name not in SOLVERS:
        raise ConfigError(key, f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    module = SOLVERS[name]
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            key, f"solver {name!r} needs the {module} package: pip install 'gradleak[{name}]'"
        )


def solve(program: Program, *, solver: str = "highs", time_limit: float = 60.0) -> Outcome:
    """Solve ``program`` with the named back-end within ``time_limit`` seconds."""
    check_solver(solver)
    return {"highs": _highs, "scip": _scip, "gurobi": _gurobi}[solver](program, time_limit)


def _highs(p: Program, time_limit: float) -> Outcome:
    res = milp(
        p.c,
        constraints=LinearConstraint(p.a, p.row_lb, p.row_ub),
        integrality=p.integrality,
        bounds=Bounds(p.lb, p.ub),
        options={"time_limit": time_limit, "disp": False},
    )
    if res.status != 0 or res.x is None:
        return Outcome(None, f"HiGHS status {res.status}: {res.message}", timed_out=res.status == 1)
    return Outcome(res.x, "optimal")


def _scip(p: Program, time_limit: float) -> Outcome:
    import pyscipopt

    m = pyscipopt.Model()
    m.hideOutput()
    m.setParam("limits/time", time_limit)
    m.setParam("parallel/maxnthreads", 1)
    xs = []
    for lo, hi, integer in zip(p.lb, p.ub, p.integrality, strict=True):
        binary = integer and lo == 0 and hi == 1
        xs.append(
            m.addVar(
                vtype="B" if binary else ("I" if integer else "C"),
                lb=float(lo) if np.isfinite(lo) else None,
                ub=float(hi) if np.isfinite(hi) else None,
            )
        )
    a = p.a.tocsr()
    for i in range(a.shape[0]):
        cols, vals = a.indices[a.indptr[i] : a.indptr[i + 1]], a.data[a.indptr[i] : a.indptr[i + 1]]
        expr = pyscipopt.quicksum(float(v) * xs[j] for j, v in zip(cols, vals, strict=True))
        lo, hi = p.row_lb[i], p.row_ub[i]
        if lo == hi:
            m.addCons(expr == float(lo))
            continue
        if np.isfinite(lo):
            m.addCons(expr >= float(lo))
        if np.isfinite(hi):
            m.addCons(expr <= float(hi))
    m.setObjective(pyscipopt.quicksum(float(c) * xs[j] for j, c in enumerate(p.c) if c), "minimize")
    m.optimize()
    status = m.getStatus()
    if status != "optimal":
        return Outcome(None, f"SCIP status {status}", timed_out=status == "timelimit")
    sol = m.getBestSol()
    return Outcome(np.array([m.getSolVal(sol, v) for v in xs]), "optimal")


def _gurobi(p: Program, time_limit: float) -> Outcome:
    import gurobipy as gp
    from gurobipy import GRB

    try:
        with gp.Env(empty=True) as env:
            env.setParam("OutputFlag", 0)
            env.start()
            with gp.Model(env=env) as m:
                m.Params.TimeLimit = time_limit
                m.Params.Threads = 1
                vtype = np.where(p.integrality > 0, GRB.INTEGER, GRB.CONTINUOUS)
                x = m.addMVar(
                    len(p.c),
                    lb=np.where(np.isfinite(p.lb), p.lb, -GRB.INFINITY),
                    ub=np.where(np.isfinite(p.ub), p.ub, GRB.INFINITY),
                    vtype=vtype,
                )
                a = p.a.tocsr()
                upper, lower = np.isfinite(p.row_ub), np.isfinite(p.row_lb)
                if upper.any():
                    m.addMConstr(a[upper], x, GRB.LESS_EQUAL, p.row_ub[upper])
                if lower.any():
                    m.addMConstr(a[lower], x, GRB.GREATER_EQUAL, p.row_lb[lower])
                m.setObjective(p.c @ x, GRB.MINIMIZE)
                m.optimize()
                if m.Status != GRB.OPTIMAL:
                    return Outcome(
                        None, f"Gurobi status {m.Status}", timed_out=m.Status == GRB.TIME_LIMIT
                    )
                return Outcome(np.asarray(x.X), "optimal")
    except gp.GurobiError as exc:  # e.g. the size-limited licence refusing a large program
        return Outcome(None, f"Gurobi error: {exc}")
