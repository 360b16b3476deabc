"""Prompt-learning methods as plug-ins: one module per method, one registry.

To add a method: write a module defining a :class:`Method` subclass (its options dataclass, paper setting, label
parts and learner; see :mod:`coopipe.methods.coop`) and register an instance: ``register(MyMethod())``. A method
of the library gets its registry line below; one of your own registers itself where you import it.
"""

from coopipe.methods.clap import CLAP
from coopipe.methods.clipadapter import CLIPAdapter
from coopipe.methods.cocoop import CoCoOp
from coopipe.methods.coop import CoOp
from coopipe.methods.kgcoop import KgCoOp
from coopipe.methods.lpp import LPP
from coopipe.methods.ordinal_coop import OrdinalCoOp
from coopipe.methods.probes import LinearProbe, Ridge
from coopipe.methods.prograd import ProGrad
from coopipe.methods.rank import RankPrompts
from coopipe.methods.taskres import TaskRes
from coopipe.methods.tipadapter import TipAdapter
from coopipe.methods.tipadapterf import TipAdapterF
from coopipe.methods.zeroshot import ZeroShot
from coopipe.methods.registry import (
    Method,
    MethodSpec,
    Optimization,
    epochs_for,
    get_method,
    method_names,
    register,
    unregister,
)

__all__ = ["Method", "MethodSpec", "Optimization", "epochs_for", "get_method", "method_names", "register", "unregister"]

register(ZeroShot())
register(LinearProbe())
register(Ridge())
register(CoOp())
register(CoCoOp())
register(KgCoOp())
register(ProGrad())
register(RankPrompts())
register(OrdinalCoOp())
register(TaskRes())
register(CLIPAdapter())
register(TipAdapter())
register(TipAdapterF())
register(LPP())
register(CLAP())
